"""Hugging Face interop: config and weight conversion for dense Llama-family checkpoints.

`families` holds one registry entry per architecture (what its config can express),
`state_dict` renames weights both ways, `folder` reads and writes HF folders lazily. Nothing
here imports `transformers`: the format is config.json plus safetensors, read and written
directly.
"""

from model.hf.families import FAMILIES, HFFamily, HFFormatError, family_for, family_of
from model.hf.folder import HFFolder, write_safetensors_shards
from model.hf.state_dict import hf_to_ours_name, ours_to_hf_name
from model.hf.weights import (
    DEFAULT_MAX_SHARD_BYTES,
    load_hf_into_model,
    load_hf_model,
    save_model_as_hf,
    write_hf_weights,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "FAMILIES",
    "HFFamily",
    "HFFolder",
    "HFFormatError",
    "family_for",
    "family_of",
    "hf_to_ours_name",
    "load_hf_into_model",
    "load_hf_model",
    "ours_to_hf_name",
    "save_model_as_hf",
    "write_hf_weights",
    "write_safetensors_shards",
]
