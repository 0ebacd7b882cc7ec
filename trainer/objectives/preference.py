"""The `dpo` and `rm` stages as Objectives: pairs in, per-pair losses summed / global pairs.

Both read a preference Batch (rows [0, n) chosen, [n, 2n) rejected; see
data_pipeline/preference.py). Units are pairs: each micro-batch's loss is its pair sum divided
by the pairs of the whole optimizer step, so accumulation and data parallelism give the same
gradient as one big batch.
"""

from __future__ import annotations

import torch
from torch import nn

from data_pipeline.batch import Batch
from trainer.losses.preference import bradley_terry_losses, dpo_losses, sequence_logps
from trainer.objectives.base import Metric, Objective, StepOutput
from trainer.objectives.preference_config import DPOConfig, RMConfig
from trainer.reference_cache import REFERENCE_CHOSEN, REFERENCE_REJECTED

MARGINS = "margins"  # Batch.extras: (num_pairs,) float, from the data (0 where none)


def _policy_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
    return sequence_logps(logits, batch.labels)


class DPOObjective(Objective):
    """The DPO family (dpo.loss) against a frozen reference.

    Reference log-probs come from the batch (`extras` reference_chosen_logps /
    reference_rejected_logps, filled from the precomputed cache) or, when absent, from a
    no-grad forward of `reference`. `flops_per_token` is the policy's training FLOPs per token
    (model.flops.flops_per_token); a live reference forward adds a third of it.
    """

    stage = "dpo"

    def __init__(
        self, config: DPOConfig, reference: nn.Module | None = None, flops_per_token: float = 0.0
    ) -> None:
        self.config = config
        self.reference = reference
        self.flops_per_token = flops_per_token
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()

    def count_units(self, batch: Batch) -> int:
        return batch.num_pairs

    def _reference_logps(self, batch: Batch) -> tuple[torch.Tensor | None, bool]:
        """(reference logps (2n,), whether a live forward was spent); None for SimPO."""
        if not self.config.uses_reference:
            return None, False
        if REFERENCE_CHOSEN in batch.extras:
            cached = torch.cat([batch.extras[REFERENCE_CHOSEN], batch.extras[REFERENCE_REJECTED]])
            return cached.to(batch.input_ids.device, torch.float32), False
        if self.reference is None:
            raise ValueError("dpo: no reference model and no cached reference log-probs")
        with torch.no_grad():
            return _policy_logps(self.reference, batch)[0], True

    def _pair_losses(self, model: nn.Module, batch: Batch) -> tuple[dict[str, torch.Tensor], bool]:
        """Per-pair tensors: the loss (with gradient) and every reported value."""
        n = batch.num_pairs
        logps, counts = _policy_logps(model, batch)
        reference, live = self._reference_logps(batch)
        config = self.config
        pairs = dpo_losses(
            logps[:n],
            logps[n:],
            None if reference is None else reference[:n],
            None if reference is None else reference[n:],
            loss=config.loss,
            beta=config.beta,
            label_smoothing=config.label_smoothing,
            simpo_gamma=config.simpo_gamma,
            chosen_lengths=counts[:n],
            rejected_lengths=counts[n:],
        )
        values = {"dpo_loss": pairs.losses, **pairs.metrics()}
        values["logps_chosen"] = logps[:n].detach()
        values["logps_rejected"] = logps[n:].detach()
        loss = pairs.losses
        if config.sft_weight > 0:
            # The RPO term: per-token NLL of the chosen completion.
            sft = -logps[:n] / counts[:n].clamp(min=1)
            values["sft_loss"] = sft
            loss = loss + config.sft_weight * sft
        values["loss"] = loss
        return values, live

    def train_step(self, model: nn.Module, batch: Batch, global_units: int) -> StepOutput:
        values, live = self._pair_losses(model, batch)
        loss = values["loss"].sum() / global_units
        metrics = {
            name: Metric(float(value.detach().sum()) / global_units, "sum")
            for name, value in values.items()
        }
        tokens = batch.num_tokens
        flops = self.flops_per_token * tokens * (4 / 3 if live else 1.0)
        return StepOutput(loss=loss, metrics=metrics, tokens=tokens, flops=flops)

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        with torch.no_grad():
            values, _ = self._pair_losses(model, batch)
        sums = {
            name: (float(value.sum()), float(batch.num_pairs)) for name, value in values.items()
        }
        sums["eval_loss"] = sums.pop("loss")
        return sums


class RewardObjective(Objective):
    """Bradley-Terry reward modelling (rm.*) on a RewardModel (model/reward.py)."""

    stage = "rm"

    def __init__(self, config: RMConfig, flops_per_token: float = 0.0) -> None:
        self.config = config
        self.flops_per_token = flops_per_token

    def count_units(self, batch: Batch) -> int:
        return batch.num_pairs

    def _values(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        n = batch.num_pairs
        scores = model(batch.input_ids, batch.pad_mask)  # (2n,)
        margins = batch.extras.get(MARGINS) if self.config.margin else None
        pairs = bradley_terry_losses(scores[:n], scores[n:], margins, self.config.center_coef)
        return {"loss": pairs.losses, **pairs.metrics()}

    def train_step(self, model: nn.Module, batch: Batch, global_units: int) -> StepOutput:
        values = self._values(model, batch)
        metrics = {
            name: Metric(float(value.detach().sum()) / global_units, "sum")
            for name, value in values.items()
        }
        tokens = batch.num_tokens
        return StepOutput(
            loss=values["loss"].sum() / global_units,
            metrics=metrics,
            tokens=tokens,
            flops=self.flops_per_token * tokens,
        )

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        with torch.no_grad():
            values = self._values(model, batch)
        sums = {
            name: (float(value.sum()), float(batch.num_pairs)) for name, value in values.items()
        }
        sums["eval_loss"] = sums.pop("loss")
        return sums
