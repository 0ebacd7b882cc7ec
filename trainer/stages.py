"""Training stages: a stage = an objective + a loader of typed batches + its own config sections.

The loop (trainer/trainer.py) is the same for every stage. `scaletrain train` runs the
"pretrain" stage registered below; a post-training stage registers itself the same way (and its
config sections with it), so that `scaletrain sft CONFIG` is a registration, not a second loop:

    register_stage(Stage("sft", build_objective=..., build_loader=..., build_eval_sets=...,
                         sections={"sft": SFTConfig, "chat": ChatConfig}))
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from data_pipeline.batch import Batch, causal_lm_batch
from data_pipeline.errors import DataError
from data_pipeline.packing import validation_sequences
from data_pipeline.sharded import build_train_loader
from data_pipeline.sources import SkipCounter
from data_pipeline.tokenizer import Tokenizer
from trainer.config import JobConfig, register_sections
from trainer.distributed import DistEnv
from trainer.objectives.base import Objective
from trainer.objectives.causal_lm import CausalLMObjective

logger = logging.getLogger(__name__)


class TrainLoader(Protocol):
    """What the loop needs from a stage's training data."""

    counts_are_local: bool  # True when skip/token counts cover this rank's data only

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step."""
        ...

    def state_dict(self, gather: Any = None) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def tokens_by_source(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass
class StageContext:
    """What a stage's builders receive: the resolved config and what setup built.

    `prepare` may replace `tokenizer` (e.g. with chat tokens added) and keep what its other
    builders need in `extras` (a chat template, a reference model).
    """

    config: JobConfig
    env: DistEnv
    tokenizer: Tokenizer
    skips: SkipCounter  # the run's skipped-record counter (checkpointed by the loop)
    micro_batch_size: int
    run_dir: Path = Path(".")
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def data_rank(self) -> tuple[int, int]:
        """(rank, size) among the readers of distinct data: the ranks of a sequence-parallel
        group (parallel.sequence_parallel consecutive ranks) read the same sequences."""
        sp = self.config.parallel.sequence_parallel
        return self.env.rank // sp, self.env.world_size // sp


@dataclass(frozen=True)
class Stage:
    """One training stage. `sections` are its extra top-level config sections (dataclasses).

    Optional setup steps, in the order setup calls them:
    prepare(ctx): after the run's tokenizer exists, before the model is built (chat template,
      added tokens: set ctx.tokenizer; files for checkpoints go into RUN_DIR/tokenizer/);
    prepare_model(ctx, model): after the initial weights are loaded, before parallelisation
      (LoRA adapters, embedding rows for added tokens); returns the module to train, which may
      wrap the transformer (a reward head) as long as it keeps it as `.backbone`.
    """

    name: str
    build_objective: Callable[[StageContext], Objective]
    build_loader: Callable[[StageContext], TrainLoader]
    build_eval_sets: Callable[[StageContext], dict[str, list[Batch]]]
    sections: dict[str, type] = field(default_factory=dict)
    prepare: Callable[[StageContext], None] | None = None
    prepare_model: Callable[[StageContext, nn.Module], nn.Module] | None = None
    # Its loader and eval sets deal by `ctx.data_rank` and its loss is a sum over tokens, so a
    # row may be split over the ranks of a sequence-parallel group.
    sequence_parallel: bool = False


_STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> None:
    """Make `stage` available by name (and its config sections to `load_job_config`)."""
    _STAGES[stage.name] = stage
    register_sections(stage.name, stage.sections)


# Post-training stages live in their own modules and register themselves when imported.
STAGE_MODULES = {
    "sft": "trainer.sft",
    "dpo": "trainer.dpo",
    "rm": "trainer.dpo",
    "distill": "trainer.distill",
}


def get_stage(name: str) -> Stage:
    """The registered stage called `name` (importing its module first if needed)."""
    if name not in _STAGES and name in STAGE_MODULES:
        importlib.import_module(STAGE_MODULES[name])
    if name not in _STAGES:
        raise KeyError(f"unknown training stage {name!r} (known: {', '.join(sorted(_STAGES))})")
    return _STAGES[name]


# ---------------------------------------------------------------------------- pretraining
def pretrain_loader(ctx: StageContext) -> TrainLoader:
    config = ctx.config
    return build_train_loader(
        ctx.tokenizer,
        config.data,
        ctx.skips,
        config.global_batch_seqs,
        ctx.micro_batch_size,
        *ctx.data_rank,
    )


def pretrain_eval_sets(ctx: StageContext) -> dict[str, list[Batch]]:
    """This rank's share of fixed validation sequences, per validation source."""
    config = ctx.config
    rank, world_size = ctx.data_rank
    wanted = config.train.eval_batches * ctx.micro_batch_size * world_size
    sets = {}
    for source in config.data.validation:
        sequences = validation_sequences(source, ctx.tokenizer, config.data, wanted)
        if not sequences:
            raise DataError(
                f"{source.path}: validation split yields no sequence of {config.data.seq_len} tokens"
            )
        per_rank = max(1, len(sequences) // world_size)
        mine = sequences[rank * per_rank : (rank + 1) * per_rank]
        stacked = (
            torch.stack(mine) if mine else torch.empty(0, config.data.seq_len + 1, dtype=torch.long)
        )
        sets[source.label] = [
            causal_lm_batch(chunk, ctx.tokenizer.eos_id, config.data.document_masking)
            for chunk in stacked.split(ctx.micro_batch_size)
        ]
    return sets


def loss_chunk_tokens(config: JobConfig) -> int:
    """`train.loss_chunk_tokens`, or 0 under ZeRO-3: the chunked loss reads the output weight
    outside the module's forward, where ZeRO-3 holds only this rank's partition of it."""
    chunk = config.train.loss_chunk_tokens
    if chunk and config.parallel.zero_stage == 3:
        logger.warning("train.loss_chunk_tokens: not with ZeRO-3; using the plain cross-entropy")
        return 0
    return chunk


PRETRAIN = Stage(
    name="pretrain",
    build_objective=lambda ctx: CausalLMObjective(
        ctx.config.data.seq_len, loss_chunk_tokens(ctx.config)
    ),
    build_loader=pretrain_loader,
    build_eval_sets=pretrain_eval_sets,
    sequence_parallel=True,
)
register_stage(PRETRAIN)
