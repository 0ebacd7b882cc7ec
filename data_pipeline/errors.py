"""User-facing data errors: one line, naming the file, record or key."""


class DataError(ValueError):
    """Bad or missing input data (a source, a record, a tokenizer file)."""
