"""The job config: one typed section per component, loaded from YAML with `--set` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.config import DataConfig, TokenizerConfig
from model.config import ModelConfig
from model.presets import preset_config
from trainer.config_io import ConfigError, apply_override, from_dict, load_yaml, to_dict


@dataclass
class RunConfig:
    """Where the run lives and how it is seeded."""

    dir: str = "runs/default"
    seed: int = 1234
    name: str | None = None


@dataclass
class TrainConfig:
    """The optimisation loop: batch, schedule, optimiser and cadence of eval and logging."""

    max_steps: int = 1000
    global_batch_tokens: int = 65536
    micro_batch_size: int | None = None  # sequences per rank per micro-step; None: derived
    max_micro_batch_size: int = 8  # cap used when deriving micro_batch_size
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8  # micro-batches per validation split
    log_every: int = 1
    progress: bool = True
    sample_prompt: str | None = "def "
    sample_tokens: int = 48
    sample_temperature: float = 0.8  # the end-of-run sample; 0 is greedy
    sample_top_p: float = 0.95
    spike_sigma: float = 6.0  # skip a step whose loss exceeds mean + k*std of recent ones; 0: off
    spike_window: int = 100
    spike_min_history: int = 20
    max_nonfinite_in_a_row: int = 5  # stop after this many non-finite steps in a row
    spike_max_in_a_row: int = 10  # after this many spikes in a row, accept the new loss level
    spike_rollback: bool = False  # on a spike, reload the latest checkpoint and skip its batches
    max_rollbacks: int = 3  # rollbacks per run; later spikes only skip their update
    # > 0: cross-entropy from hidden states this many target tokens at a time, never the full
    # (tokens x vocab) logits (trainer/losses/cross_entropy.py); ZeRO 0-2. 0: plain logits.
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        for key in (
            "max_steps",
            "global_batch_tokens",
            "eval_batches",
            "log_every",
            "max_micro_batch_size",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size: must be positive, got {self.micro_batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.spike_sigma < 0 or self.spike_window < 1 or self.spike_min_history < 2:
            raise ValueError(
                "spike_sigma: must be >= 0 (with spike_window >= 1, spike_min_history >= 2)"
            )
        if self.max_nonfinite_in_a_row < 1:
            raise ValueError(
                f"max_nonfinite_in_a_row: must be >= 1, got {self.max_nonfinite_in_a_row}"
            )
        if self.spike_max_in_a_row < 1:
            raise ValueError(f"spike_max_in_a_row: must be >= 1, got {self.spike_max_in_a_row}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")
        if self.max_rollbacks < 0:
            raise ValueError(f"max_rollbacks: must be >= 0, got {self.max_rollbacks}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(
                f"loss_chunk_tokens: must be >= 0 (0: plain logits), got {self.loss_chunk_tokens}"
            )


@dataclass
class ParallelConfig:
    """How the model is spread over ranks and which numerics it runs in."""

    zero_stage: int = 0
    expert_parallel: int = 1
    # Ranks per sequence-parallel group: each holds T/P tokens of every row (DeepSpeed Ulysses)
    sequence_parallel: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload: Literal["none", "cpu"] = "none"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # selective: recompute every k-th block; selective_ops: keep matmul/attention outputs and
    # recompute the element-wise ops of every block
    activation_checkpointing: Literal["none", "full", "selective", "selective_ops"] = "none"
    checkpoint_every: int = 2  # selective: recompute every k-th block
    compile: bool = False  # torch.compile each block (inductor; CPU too)
    overlap_comm: bool | None = None  # None: on with CUDA, off on CPU
    reduce_bucket_size: int = 50_000_000  # elements
    allgather_bucket_size: int = 50_000_000  # elements
    init_timeout_s: float = 300.0  # collectives until the first step ends (setup, loading)
    step_timeout_s: float = 100.0  # collectives afterwards: a stalled rank fails the job
    planned_world_size: int | None = None  # set by `scaletrain plan`: what --dry-run plans for

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.expert_parallel < 1:
            raise ValueError(f"expert_parallel: must be >= 1, got {self.expert_parallel}")
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel: must be >= 1, got {self.sequence_parallel}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: must be >= 1, got {self.checkpoint_every}")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")
        for key in ("init_timeout_s", "step_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")


@dataclass
class CheckpointConfig:
    """When to save, how many to keep, and what to resume from."""

    every: int = 500
    keep: int = 3  # complete checkpoints kept; 0 keeps all
    resume: str = "auto"  # auto (latest in run.dir), none, or a checkpoint folder
    async_save: bool = False  # snapshot at the save step, write in the background
    async_timeout_s: float = 600.0  # rank 0 waits this long for the other ranks' files

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every: must be >= 0 (0 saves only at the end), got {self.every}")
        if self.keep < 0:
            raise ValueError(f"keep: must be >= 0, got {self.keep}")
        if self.async_timeout_s <= 0:
            raise ValueError(f"async_timeout_s: must be positive, got {self.async_timeout_s}")


# Extra config sections by stage: {stage: {section name: dataclass}} (see register_sections).
_STAGE_SECTIONS: dict[str, dict[str, type]] = {}


def register_sections(stage: str, sections: dict[str, type]) -> None:
    """Let `load_job_config(..., stage=stage)` accept these top-level sections (e.g. `sft:`).

    Each section is a dataclass owned by the stage; it lands in `JobConfig.sections[name]`
    and is written back into config.yaml beside the common sections.
    """
    _STAGE_SECTIONS.setdefault(stage, {}).update(sections)


def stage_sections(stage: str) -> dict[str, type]:
    """The extra sections registered for `stage` (empty for pretraining)."""
    return dict(_STAGE_SECTIONS.get(stage, {}))


@dataclass
class JobConfig:
    """Everything one run needs: the common sections, plus the stage's own in `sections`."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # The stage's extra sections by name (dataclasses); not a YAML key of its own.
    sections: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.train.global_batch_tokens % self.data.seq_len:
            raise ConfigError(
                f"train.global_batch_tokens: {self.train.global_batch_tokens} is not a multiple "
                f"of data.seq_len={self.data.seq_len}"
            )

    @property
    def global_batch_seqs(self) -> int:
        return self.train.global_batch_tokens // self.data.seq_len

    def resolved_precision(self, cuda: bool) -> str:
        if self.parallel.precision == "auto":
            return "bf16" if cuda else "fp32"
        return self.parallel.precision

    def to_dict(self) -> dict[str, Any]:
        raw = to_dict(self)
        raw.pop("sections")
        return raw | {name: to_dict(section) for name, section in self.sections.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _expand_model_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """A `model:` section with `preset: NAME` becomes the preset's fields overlaid by the rest."""
    model = raw.get("model")
    if isinstance(model, dict) and model.get("preset"):
        try:
            base = preset_config(str(model["preset"]))
        except ValueError as exc:
            raise ConfigError(f"model.{exc}") from None
        raw = {**raw, "model": {**base, **model}}
    return raw


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_COMMON_SECTIONS = ("run", "model", "tokenizer", "data", "train", "parallel", "checkpoint")


def job_config_from_dict(
    raw: dict[str, Any],
    where: str = "",
    stage: str = "pretrain",
    ignore_unknown_sections: bool = False,
    resolve_init_from: bool = True,
) -> JobConfig:
    """Build and validate a JobConfig from a nested mapping.

    With `model.init_from` the network's shape comes from the source (trainer.init_from);
    a checkpoint's own config.yaml is already resolved (`resolve_init_from=False`).

    Top-level sections registered for `stage` are built into `JobConfig.sections`; with
    `ignore_unknown_sections` (readers of a checkpoint's config.yaml, which may come from a
    stage this process does not know) any other unknown section is dropped, not an error.
    """
    extra_types = stage_sections(stage)
    common = {k: v for k, v in raw.items() if k not in extra_types}
    if ignore_unknown_sections:
        common = {k: v for k, v in common.items() if k in _COMMON_SECTIONS}
    model = common.get("model")
    if resolve_init_from and isinstance(model, dict) and model.get("init_from"):
        # The source alone defines the network; keys written beside it must agree.
        from trainer.init_from import resolve_init_from_model

        try:
            resolved = resolve_init_from_model(model, str(model["init_from"]))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
        common = {**common, "model": to_dict(resolved)}
    try:
        config = from_dict(JobConfig, _expand_model_preset(common))
        for name, section_type in extra_types.items():
            config.sections[name] = from_dict(section_type, raw.get(name), name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
    return config


def load_job_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    stage: str = "pretrain",
    ignore_unknown_sections: bool = False,
) -> JobConfig:
    """Load a YAML config (or the defaults when path is None) and apply `--set` overrides.

    `stage` names the training stage whose extra sections are accepted (register_sections);
    `ignore_unknown_sections` is for reading a checkpoint's config.yaml (generate, eval, export).
    """
    raw = load_yaml(path) if path is not None else {}
    if overrides:
        # Overrides may address keys the file leaves at their defaults (data.train.0.weight),
        # so they apply to the defaults merged with the file. `model` stays as written so that
        # its preset is expanded afterwards.
        defaults = JobConfig().to_dict()
        defaults.pop("model")
        defaults |= {name: to_dict(cls()) for name, cls in stage_sections(stage).items()}
        raw = _merge(defaults, raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return job_config_from_dict(
        raw,
        where=str(path) if path is not None else "",
        stage=stage,
        ignore_unknown_sections=ignore_unknown_sections,
        # A checkpoint's config.yaml holds the resolved shape; its source may be gone.
        resolve_init_from=not ignore_unknown_sections,
    )


def write_config(config: JobConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again by load_job_config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config.to_yaml())
