"""The interface a training stage implements; the loop (trainer/) drives it.

An objective turns a micro-batch into a loss contribution and metrics. The loop counts the
objective's units (target tokens, pairs, ...) over the whole optimizer step, across ranks and
accumulation steps, before the first forward, and passes that global count in: each
micro-batch's loss is the *sum* over its units divided by that count, so the gradient of a step
is the same however the step is split into micro-batches and ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from data_pipeline.batch import Batch

Reduction = Literal["sum", "mean", "max", "last"]


@dataclass
class Metric:
    """One scalar of one micro-batch and how it combines over micro-batches and ranks.

    sum: added over micro-batches and ranks (use it for values already divided by the global
    unit count, e.g. a per-token mean); mean: averaged over micro-batches, then ranks;
    max: the largest anywhere; last: rank 0's value from its last micro-batch, not reduced
    (for a non-scalar such as a histogram; it reaches metrics.jsonl but not TensorBoard).
    """

    value: Any
    reduce: Reduction = "sum"


@dataclass
class StepOutput:
    """What an objective returns for one micro-batch of a training step.

    loss: the tensor to back-propagate (sum over this micro-batch's units / global units,
      auxiliary losses included); metrics: reported values, `loss` among them;
    tokens: non-padding tokens processed (the work, for tokens/s);
    flops: floating-point operations spent (forward + backward of the trained model and any
      extra forward, e.g. a reference or teacher model).
    """

    loss: torch.Tensor
    metrics: dict[str, Metric] = field(default_factory=dict)
    tokens: int = 0
    flops: float = 0.0


class Objective(ABC):
    """A training stage's loss. Stateless objectives need not override the state methods."""

    #: recorded in checkpoints ("pretrain", "sft", "dpo", ...)
    stage: str = "pretrain"

    @abstractmethod
    def count_units(self, batch: Batch) -> int:
        """This micro-batch's units over which the loss is averaged (target tokens, pairs)."""

    @abstractmethod
    def train_step(self, model: nn.Module, batch: Batch, global_units: int) -> StepOutput:
        """Forward one micro-batch; the loss is this batch's unit sum / `global_units`."""

    @abstractmethod
    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        """Evaluation sums of one batch: name -> (numerator, denominator); the loop adds both
        over batches and ranks and reports numerator / denominator (`eval_loss` among them)."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""
        del state  # stateless by default
