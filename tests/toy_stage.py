"""A toy training stage for the loop's tests (and docs/ARCHITECTURE.md's worked example).

Its loader makes deterministic micro-batches of random tokens with about half the labels masked
(unevenly across rows, so micro-batches hold different numbers of target tokens) and some rows
right-padded; its objective is the causal-LM loss plus three metrics whose reductions a test
can predict exactly. Run under torchrun: `python -m tests.toy_stage CONFIG`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from data_pipeline.batch import IGNORE_INDEX, Batch
from trainer.losses.cross_entropy import cross_entropy_sum
from trainer.objectives.base import Metric, Objective, StepOutput
from trainer.stages import Stage, StageContext, register_stage


@dataclass
class ToyConfig:
    """The toy stage's own config section (`toy:`)."""

    seed: int = 0
    vocab: int = 300  # token ids drawn from [3, vocab)
    pad_rows: int = 3  # rows (of each global batch) right-padded by a quarter
    mean_of_means: bool = False  # the old, biased loss: each micro-batch's mean, averaged


def global_batch(config: ToyConfig, step: int, rows: int, seq_len: int) -> Batch:
    """Global batch `step` (all ranks' rows), the same whatever the world size and split."""
    gen = torch.Generator().manual_seed(config.seed * 1000 + step)
    input_ids = torch.randint(3, config.vocab, (rows, seq_len), generator=gen)
    labels = torch.randint(3, config.vocab, (rows, seq_len), generator=gen)
    # Row r keeps about a (r+1)/(rows+1) share of its labels: uneven targets per micro-batch.
    keep = torch.rand(rows, seq_len, generator=gen) < torch.linspace(0.1, 0.9, rows)[:, None]
    labels = torch.where(keep, labels, IGNORE_INDEX)
    pad_mask = torch.zeros(rows, seq_len, dtype=torch.bool)
    pad_mask[: config.pad_rows, seq_len - seq_len // 4 :] = True
    input_ids = torch.where(pad_mask, 0, input_ids)
    labels = torch.where(pad_mask, IGNORE_INDEX, labels)
    return Batch(input_ids=input_ids, labels=labels, pad_mask=pad_mask)


class ToyLoader:
    """This rank's contiguous slice of each global batch, cut into micro-batches."""

    counts_are_local = False

    def __init__(self, ctx: StageContext) -> None:
        self.config: ToyConfig = ctx.config.sections["toy"]
        self.rows = ctx.config.global_batch_seqs
        self.seq_len = ctx.config.data.seq_len
        self.rank, self.world_size = ctx.env.rank, ctx.env.world_size
        self.micro_batch_size = ctx.micro_batch_size
        self.step = 0

    def next_step(self) -> list[Batch]:
        whole = global_batch(self.config, self.step, self.rows, self.seq_len)
        self.step += 1
        per_rank = self.rows // self.world_size
        first = self.rank * per_rank
        return [
            Batch(
                input_ids=whole.input_ids[start : start + self.micro_batch_size],
                labels=whole.labels[start : start + self.micro_batch_size],
                pad_mask=whole.pad_mask[start : start + self.micro_batch_size]
                if whole.pad_mask is not None
                else None,
            )
            for start in range(first, first + per_rank, self.micro_batch_size)
        ]

    def state_dict(self, gather: Any = None) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def tokens_by_source(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class ToyObjective(Objective):
    """Causal-LM loss over target tokens, with metrics of known reductions:
    `toy_targets` (sum: the step's target tokens), `toy_rank_max` (max: the last rank) and
    `toy_rank_mean` (mean over ranks of the rank index)."""

    stage = "toy"

    def __init__(self, config: ToyConfig, rank: int, micro_batches_per_step: int) -> None:
        self.config = config
        self.rank = rank
        self.micro_batches_per_step = micro_batches_per_step  # for the biased variant only

    def count_units(self, batch: Batch) -> int:
        return batch.num_target_tokens

    def train_step(self, model: nn.Module, batch: Batch, global_units: int) -> StepOutput:
        logits = model(batch.input_ids)
        loss_sum = cross_entropy_sum(logits, batch.labels)
        if self.config.mean_of_means:  # what the loop did before: micro-batch means averaged
            loss = loss_sum / batch.num_target_tokens / self.micro_batches_per_step
        else:
            loss = loss_sum / global_units
        metrics = {
            "loss": Metric(loss.item(), "sum"),
            "toy_targets": Metric(float(batch.num_target_tokens), "sum"),
            "toy_rank_max": Metric(float(self.rank), "max"),
            "toy_rank_mean": Metric(float(self.rank), "mean"),
        }
        return StepOutput(loss=loss, metrics=metrics, tokens=batch.num_tokens, flops=0.0)

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        loss_sum = cross_entropy_sum(model(batch.input_ids), batch.labels)
        return {"eval_loss": (loss_sum.item(), float(batch.num_target_tokens))}


def _objective(ctx: StageContext) -> Objective:
    micro_batches = ctx.config.global_batch_seqs // ctx.env.world_size // ctx.micro_batch_size
    # A "world" of micro-batches: the biased variant averages over all of them on all ranks.
    return ToyObjective(
        ctx.config.sections["toy"], ctx.env.rank, micro_batches * ctx.env.world_size
    )


TOY = Stage(
    name="toy",
    build_objective=_objective,
    build_loader=ToyLoader,
    build_eval_sets=lambda ctx: {},
    sections={"toy": ToyConfig},
)
register_stage(TOY)


def main(config_path: str) -> None:
    """Train the toy stage (one process of a torchrun job)."""
    from launch.environment import detect_environment
    from trainer.config import load_job_config
    from trainer.distributed import destroy
    from trainer.trainer import Trainer

    trainer = Trainer(load_job_config(config_path, stage="toy"), detect_environment(), "toy")
    trainer.setup()
    trainer.fit()
    destroy()


if __name__ == "__main__":
    main(sys.argv[1])
