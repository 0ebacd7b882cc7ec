"""Config sections owned by the data pipeline: `tokenizer.*` and `data.*`."""

from __future__ import annotations

from dataclasses import dataclass, field

# Record formats of post-training sources (`format:` on a source); see data_pipeline.conversations.
RECORD_FORMATS = ("text", "messages", "prompt_completion", "sharegpt", "preference", "hh")


@dataclass
class SourceConfig:
    """One data source: a local file/glob/folder, `hf:NAME[:CONFIG]`, or `builtin:stdlib`."""

    path: str
    weight: float = 1.0
    text_field: str = "text"
    name: str | None = None
    # Record format for post-training (None: detected from each record's fields).
    format: str | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        if self.weight <= 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")
        if self.format is not None and self.format not in RECORD_FORMATS:
            raise ValueError(
                f"format: must be one of {', '.join(RECORD_FORMATS)}, got {self.format!r}"
            )

    @property
    def label(self) -> str:
        """The name used in logs and metrics."""
        return self.name or self.path.removeprefix("builtin:").replace("/", "_")


@dataclass
class MixturePhase:
    """Once `after_tokens` tokens have been drawn from the train sources (all ranks together:
    the count is global), mix them by `weights` (by source name).

    Sources a phase does not name keep their own `weight`; a weight of 0 pauses a source.
    Use it for e.g. a final annealing mix of high-quality data.
    """

    after_tokens: int
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.after_tokens < 0:
            raise ValueError(f"after_tokens: must be >= 0, got {self.after_tokens}")
        for name, weight in self.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
                raise ValueError(f"weights.{name}: must be a number >= 0, got {weight!r}")


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
    # Pre-tokenized shards written by `scaletrain data prepare` (None: tokenize while training).
    prepared: str | None = None
    prepare_dir: str | None = None  # where `data prepare` writes (default: data.prepared)
    ignore_fingerprint: bool = False  # use shards even if the tokenizer/sources changed
    # Quality filters (counted per reason in the skip counters) and long-document guard.
    min_doc_chars: int = 0
    max_nontext_fraction: float = 1.0
    dedup: bool = False  # exact dedup by hash within each source's epoch
    max_doc_tokens: int = 0  # longer documents are bad input (0: no limit)
    mixture_schedule: list[MixturePhase] = field(default_factory=list)
    num_workers: int = 0  # processes per rank reading + tokenizing + packing (0: in process)
    # Streaming training reads in V logical shards (0: one per sequence of the global batch);
    # V must divide the global batch and the world size must divide V.
    logical_shards: int = 0
    document_masking: bool = False  # attention stays within each packed document

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {self.seq_len}")
        if not self.train:
            raise ValueError("train: needs at least one source")
        if not 0 < self.builtin_validation_percent < 100:
            raise ValueError("builtin_validation_percent: must be in (0, 100)")
        if self.min_doc_chars < 0:
            raise ValueError(f"min_doc_chars: must be >= 0, got {self.min_doc_chars}")
        if not 0 < self.max_nontext_fraction <= 1:
            raise ValueError(
                f"max_nontext_fraction: must be in (0, 1], got {self.max_nontext_fraction}"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.logical_shards < 0:
            raise ValueError(f"logical_shards: must be >= 0, got {self.logical_shards}")
        if self.max_doc_tokens < 0:
            raise ValueError(f"max_doc_tokens: must be >= 0, got {self.max_doc_tokens}")
        labels = [s.label for s in self.train]
        if len(set(labels)) != len(labels):
            raise ValueError(f"train: source names must be unique, got {labels}")
        previous = -1
        for index, phase in enumerate(self.mixture_schedule):
            if phase.after_tokens <= previous:
                raise ValueError(
                    f"mixture_schedule.{index}.after_tokens: phases must be in increasing order"
                )
            previous = phase.after_tokens
            unknown = sorted(set(phase.weights) - set(labels))
            if unknown:
                raise ValueError(
                    f"mixture_schedule.{index}.weights: unknown source {unknown[0]!r} "
                    f"(train sources: {', '.join(labels)})"
                )
            weights = [phase.weights.get(s.label, s.weight) for s in self.train]
            if not any(w > 0 for w in weights):
                raise ValueError(f"mixture_schedule.{index}.weights: all weights are 0")


@dataclass
class TokenizerConfig:
    """Load `path` (tokenizer.model, tokenizer.json or a folder with one), or train a
    sentencepiece model on `data.train` when it is None."""

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


@dataclass
class SFTConfig:
    """`sft.*`: which tokens carry the loss, how conversations fill rows, and what to do with a
    conversation longer than `data.seq_len`."""

    train_on: str = "assistant"  # assistant | last_assistant | all
    packing: bool = True  # pack conversations into rows (document-masked) or pad one per row
    truncation: str = "error"  # error | drop | truncate (keeps the prompt, cuts the response)
    pack_buffer: int = 1000  # conversations sorted together by best-fit decreasing

    def __post_init__(self) -> None:
        if self.train_on not in ("assistant", "last_assistant", "all"):
            raise ValueError(
                f"train_on: must be 'assistant', 'last_assistant' or 'all', got {self.train_on!r}"
            )
        if self.truncation not in ("error", "drop", "truncate"):
            raise ValueError(
                f"truncation: must be 'error', 'drop' or 'truncate', got {self.truncation!r}"
            )
        if self.pack_buffer < 1:
            raise ValueError(f"pack_buffer: must be >= 1, got {self.pack_buffer}")


@dataclass
class ChatConfig:
    """`chat.*`: the chat template: `auto` (the checkpoint's own), `chatml`, or a .jinja path."""

    template: str = "auto"

    def __post_init__(self) -> None:
        if not self.template:
            raise ValueError("template: must be 'auto', 'chatml' or a path to a .jinja file")
