"""The `dpo` and `rm` stages as Objectives: pairs in, per-pair losses summed / global pairs.

Both read a preference Batch (rows [0, n) chosen, [n, 2n) rejected; see
data_pipeline/preference.py). Units are pairs: each micro-batch's loss is its pair sum divided
by the pairs of the whole optimizer step, so accumulation and data parallelism give the same
gradient as one big batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import IGNORE_INDEX, Batch
from model.flops import flops_per_token
from model.lora import TrainedFlops, adapters_disabled
from model.transformer import Transformer
from trainer.checkpointing.checkpoint import CheckpointError
from trainer.losses.preference import bradley_terry_losses, dpo_losses, sequence_logps
from trainer.objectives.base import Metric, Objective, StepOutput
from trainer.objectives.preference_config import DPOConfig, RMConfig
from trainer.reference_cache import REFERENCE_CHOSEN, REFERENCE_REJECTED

MARGINS = "margins"  # Batch.extras: (num_pairs,) float, from the data (0 where none)


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)


def _policy_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return sequence_logps(_logits(model, batch), batch.labels)


def _transformer(model: nn.Module) -> Transformer | None:
    """The Transformer inside a DeepSpeed engine (or the model itself); None for other modules."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, Transformer) else None


def token_kl_sum(
    policy_logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """(sum over target tokens of KL(policy || reference) of the next-token distributions,
    number of target tokens): the `kl_to_reference` eval metric is their ratio."""
    mask = labels != IGNORE_INDEX
    policy = F.log_softmax(policy_logits.float()[mask], dim=-1)  # (N, V)
    reference = F.log_softmax(reference_logits.float()[mask], dim=-1)
    kl = (policy.exp() * (policy - reference)).sum(dim=-1)
    return float(kl.sum()), float(mask.sum())


class DPOObjective(Objective):
    """The DPO family (dpo.loss) against a frozen reference.

    Reference log-probs come from the batch (`extras` reference_chosen_logps /
    reference_rejected_logps, filled from the precomputed cache) or, when absent, from a
    no-grad forward of `reference`. `seq_len` prices the FLOPs (0: none counted): the policy's
    training FLOPs per token (model.lora.trained_flops_per_token: LoRA trains no base weight),
    plus, with a live reference, a forward of the whole network.
    """

    stage = "dpo"

    def __init__(
        self,
        config: DPOConfig,
        reference: nn.Module | None = None,
        seq_len: int = 0,
        reference_sha256: str | None = None,
        adapters_off_reference: bool = False,
    ) -> None:
        self.config = config
        self.reference = reference
        self.seq_len = seq_len
        self.policy_flops_per_token = TrainedFlops(seq_len)
        # LoRA: the reference is the policy with its adapters switched off (no second copy).
        self.adapters_off_reference = adapters_off_reference
        # The reference's weights (checkpointed: a resume against another reference is refused).
        self.reference_sha256 = reference_sha256
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"reference_sha256": self.reference_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stored = state.get("reference_sha256")
        if stored is not None and stored != self.reference_sha256:
            raise CheckpointError(
                f"dpo.reference: the checkpoint was trained against reference weights "
                f"{stored[:12]}, this run's reference is {str(self.reference_sha256)[:12]}"
            )

    def _reference_forward(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        """Reference logits of a live forward (None when there is no live reference)."""
        if self.adapters_off_reference:
            transformer = _transformer(model)
            assert transformer is not None
            with torch.no_grad(), adapters_disabled(transformer):
                return _logits(model, batch)
        if self.reference is None:
            return None
        with torch.no_grad():
            return _logits(self.reference, batch)

    def count_units(self, batch: Batch) -> int:
        return batch.num_pairs

    def _reference_logps(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor | None, bool]:
        """(reference logps (2n,), whether a live forward was spent); None for SimPO."""
        if not self.config.uses_reference:
            return None, False
        if REFERENCE_CHOSEN in batch.extras:
            cached = torch.cat([batch.extras[REFERENCE_CHOSEN], batch.extras[REFERENCE_REJECTED]])
            return cached.to(batch.input_ids.device, torch.float32), False
        logits = self._reference_forward(model, batch)
        if logits is None:
            raise ValueError("dpo: no reference model and no cached reference log-probs")
        return sequence_logps(logits, batch.labels)[0], True

    def _pair_losses(self, model: nn.Module, batch: Batch) -> tuple[dict[str, torch.Tensor], bool]:
        """Per-pair tensors: the loss (with gradient) and every reported value."""
        n = batch.num_pairs
        # The reference first: with adapters off it is the policy's own forward, which must
        # not overwrite the policy's router statistics (the MoE aux loss read below).
        reference, live = self._reference_logps(model, batch)
        logps, counts = _policy_logps(model, batch)
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
        transformer = _transformer(model)
        if transformer is not None and transformer.config.n_experts:
            # The policy's router aux loss (the reference is frozen: it has none to train),
            # weighted by this micro-batch's share of the step's pairs.
            aux_loss = transformer.moe_aux_loss()
            loss = loss + aux_loss * (batch.num_pairs / global_units)
            metrics["aux_loss"] = Metric(aux_loss.item(), "mean")
            metrics["loss"] = Metric(loss.item(), "sum")
        tokens = batch.num_tokens
        flops = 0.0
        if transformer is not None and self.seq_len:
            per_token = self.policy_flops_per_token(transformer, transformer.config)
            if live:  # the reference's forward: a third of full training
                per_token += flops_per_token(transformer.config, self.seq_len) / 3
            flops = per_token * tokens
        return StepOutput(loss=loss, metrics=metrics, tokens=tokens, flops=flops)

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        with torch.no_grad():
            values, _ = self._pair_losses(model, batch)
            sums = {
                name: (float(value.sum()), float(batch.num_pairs)) for name, value in values.items()
            }
            sums["eval_loss"] = sums.pop("loss")
            # kl_to_reference: mean per-token KL(policy || reference) over the chosen
            # completions' tokens (needs a live reference; absent with a precomputed cache).
            n = batch.num_pairs
            chosen = Batch(
                batch.input_ids[:n],
                batch.labels[:n],
                pad_mask=None if batch.pad_mask is None else batch.pad_mask[:n],
            )
            reference = self._reference_forward(model, chosen)
            if reference is not None:
                sums["kl_to_reference"] = token_kl_sum(
                    _logits(model, chosen), reference, chosen.labels
                )
        return sums


class RewardObjective(Objective):
    """Bradley-Terry reward modelling (rm.*) on a RewardModel (model/reward.py)."""

    stage = "rm"

    def __init__(self, config: RMConfig, seq_len: int = 0) -> None:
        self.config = config
        self.seq_len = seq_len  # prices the FLOPs (0: none counted)
        # The backbone without its vocabulary head (the score head is one row).
        self.backbone_flops_per_token = TrainedFlops(seq_len, output_head=False)

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
        flops = 0.0
        backbone = getattr(getattr(model, "module", model), "backbone", None)
        if isinstance(backbone, Transformer) and self.seq_len:
            flops = tokens * self.backbone_flops_per_token(backbone, backbone.config)
        return StepOutput(
            loss=values["loss"].sum() / global_units, metrics=metrics, tokens=tokens, flops=flops
        )

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        with torch.no_grad():
            values = self._values(model, batch)
        sums = {
            name: (float(value.sum()), float(batch.num_pairs)) for name, value in values.items()
        }
        sums["eval_loss"] = sums.pop("loss")
        return sums
