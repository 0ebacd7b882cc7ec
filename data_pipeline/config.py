"""Config sections owned by the data pipeline: `tokenizer.*` and `data.*`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One data source: a local file/glob/folder, `hf:NAME[:CONFIG]`, or `builtin:stdlib`."""

    path: str
    weight: float = 1.0
    text_field: str = "text"
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        if self.weight <= 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")

    @property
    def label(self) -> str:
        """The name used in logs and metrics."""
        return self.name or self.path.removeprefix("builtin:").replace("/", "_")


def _stdlib() -> list[SourceConfig]:
    return [SourceConfig(path="builtin:stdlib")]


@dataclass
class DataConfig:
    """Where training and validation text comes from and how it is packed."""

    seq_len: int = 512
    train: list[SourceConfig] = field(default_factory=_stdlib)
    validation: list[SourceConfig] = field(default_factory=_stdlib)
    strict: bool = False
    shuffle_seed: int = 0
    shuffle_buffer: int = 1000
    builtin_validation_percent: float = 2.0  # share of builtin:stdlib files held out

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {self.seq_len}")
        if not self.train:
            raise ValueError("train: needs at least one source")
        if not 0 < self.builtin_validation_percent < 100:
            raise ValueError("builtin_validation_percent: must be in (0, 100)")


@dataclass
class TokenizerConfig:
    """Load a sentencepiece model from `path`, or train one on `data.train` when it is None."""

    path: str | None = None
    vocab_size: int = 4096
    model_type: str = "bpe"
    train_max_sentences: int = 300_000
    train_max_sentence_length: int = 4096

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(
                f"vocab_size: must be at least 300 (byte fallback needs 259), got {self.vocab_size}"
            )
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type: must be 'bpe' or 'unigram', got {self.model_type!r}")
