"""Metrics: their reduction over micro-batches and ranks, and the sinks on rank 0
(metrics.jsonl and TensorBoard)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from trainer.distributed import all_reduce_max, all_reduce_sum
from trainer.objectives.base import Reduction, StepOutput


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON object per line and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step >= 0 and self.path.exists():
            self._truncate_after(resume_step)
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        self._file = self.path.open("a")

    def _truncate_after(self, step: int) -> None:
        """Drop lines a crashed run wrote after the checkpoint we resume from."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        self.writer.close()


@dataclass
class StepTotals:
    """One training step's metrics reduced over micro-batches and ranks, with its work."""

    metrics: dict[str, Any]
    tokens: int  # non-padding tokens, all ranks
    flops: float  # all ranks


def reduce_step_outputs(
    outputs: list[StepOutput], device: torch.device, world_size: int
) -> StepTotals:
    """Combine the micro-batches' outputs of every rank, each metric by its declared
    reduction (a collective: every rank must call, with the same metric names).

    Sums, means, tokens and flops travel in one all-reduce; maxima in a second only when
    some metric asks for one.
    """
    declared: dict[str, Reduction] = {}
    for output in outputs:
        for name, metric in output.metrics.items():
            declared.setdefault(name, metric.reduce)
    names = sorted(declared)
    summed = [n for n in names if declared[n] in ("sum", "mean")]
    maxed = [n for n in names if declared[n] == "max"]
    totals = []
    for name in summed:
        values = [float(o.metrics[name].value) for o in outputs if name in o.metrics]
        total = sum(values)
        totals.append(total / len(values) if declared[name] == "mean" else total)
    tokens, flops = sum(o.tokens for o in outputs), sum(o.flops for o in outputs)
    *reduced, all_tokens, all_flops = all_reduce_sum([*totals, float(tokens), flops], device)
    maxima = all_reduce_max(
        [max(float(o.metrics[n].value) for o in outputs if n in o.metrics) for n in maxed],
        device,
    )
    metrics: dict[str, Any] = {}
    for name, value in zip(summed, reduced, strict=True):
        metrics[name] = value / world_size if declared[name] == "mean" else value
    metrics |= dict(zip(maxed, maxima, strict=True))
    for name in names:
        if declared[name] == "last":
            metrics[name] = next(
                o.metrics[name].value for o in reversed(outputs) if name in o.metrics
            )
    return StepTotals(metrics, int(all_tokens), all_flops)
