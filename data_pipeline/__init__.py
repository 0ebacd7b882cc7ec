"""Tokenizer, document sources and sequence packing."""
