"""The `distill` stage's objective: a frozen teacher's next-token distributions as targets.

Per target token (label != -100) the student pays

    kd_weight * D(teacher || student) + (1 - kd_weight) * (-log q(label))

where D is `distill.loss` (forward_kl, reverse_kl or jsd, times T^2; trainer/losses/
distillation.py). Both sums are divided by the global count of target tokens of the optimizer
step, so accumulation and data parallelism give the same update as one big batch. Neither
model's (tokens x vocab) logits are ever held whole: both losses run chunk by chunk from the
final hidden states and the output weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from data_pipeline.batch import Batch
from model.flops import flops_per_token
from model.lora import TrainedFlops
from model.transformer import Transformer
from trainer.checkpointing.checkpoint import CheckpointError
from trainer.losses.cross_entropy import (
    DEFAULT_CHUNK_TOKENS,
    chunked_cross_entropy_sum,
    cross_entropy_sum,
)
from trainer.losses.distillation import DIVERGENCES, distillation_loss_sum
from trainer.objectives.base import Metric, Objective, StepOutput
from trainer.objectives.causal_lm import unwrap
from trainer.reference_cache import model_weights_sha256


@dataclass
class DistillConfig:
    """`scaletrain distill`: the `distill:` section.

    teacher: a scaletrain checkpoint folder, a run dir (its newest complete checkpoint) or
      `hf:DIR`, with the run's tokenizer (same pieces, same ids); its shape may differ from the
      student's. loss: the divergence (forward_kl | reverse_kl | jsd); jsd_beta: the weight of
      the teacher's side in the generalised JSD; temperature: both distributions are softened
      by it (and the divergence multiplied by T^2); kd_weight: the mix
      kd_weight x KD + (1 - kd_weight) x next-token cross-entropy; chunk_tokens: target tokens
      projected to the vocabulary at a time.
    """

    teacher: str | None = None
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    kd_weight: float = 1.0
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if self.loss not in DIVERGENCES:
            raise ValueError(f"loss: must be one of {', '.join(DIVERGENCES)}, got {self.loss!r}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta: must be in (0, 1), got {self.jsd_beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be positive, got {self.temperature}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight: must be in [0, 1], got {self.kd_weight}")
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens: must be positive, got {self.chunk_tokens}")


@contextlib.contextmanager
def _forward_is(module: nn.Module, forward: Any) -> Iterator[None]:
    """Run `forward` in place of `module.forward` while the block lasts."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


class DistillObjective(Objective):
    """Knowledge distillation from a frozen `teacher`: a whole Transformer, or at ZeRO-3 the
    inference-only engine of trainer/frozen.py around one (its parameters partitioned over the
    ranks; every rank runs the same teacher forwards, one per micro-batch).

    A sharded teacher's output matrix is read outside its forward (the chunked loss projects
    its hidden states chunk by chunk), so the caller passes it whole as `teacher_head`, with
    `teacher_sha256`, both taken before sharding. The unit is a target token. `seq_len`
    prices the FLOPs: the student's forward + backward plus the teacher's forward (a third of
    its training FLOPs) per token.
    """

    stage = "distill"

    def __init__(
        self,
        config: DistillConfig,
        teacher: nn.Module,
        seq_len: int,
        teacher_sha256: str | None = None,
        teacher_head: torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.teacher = teacher
        self.teacher_module = unwrap(teacher)
        if teacher is self.teacher_module:
            self.teacher_module.requires_grad_(False).eval()
        self.teacher_head = teacher_head
        self.seq_len = seq_len
        self.student_flops_per_token = TrainedFlops(seq_len)
        # Recorded in checkpoints: a resumed run must distill from the same weights.
        if teacher_sha256 is None and teacher is not self.teacher_module:
            raise ValueError("a sharded teacher's teacher_sha256 must be taken before sharding")
        self.teacher_sha256 = teacher_sha256 or model_weights_sha256(self.teacher_module)
        self.teacher_flops_per_token = flops_per_token(self.teacher_module.config, seq_len) / 3

    def count_units(self, batch: Batch) -> int:
        return batch.num_target_tokens

    @property
    def teacher_weight(self) -> torch.Tensor:
        """The teacher's output matrix (vocab, d_teacher)."""
        if self.teacher_head is not None:
            return self.teacher_head
        return self.teacher_module.output_weight

    def _teacher_hidden(self, batch: Batch) -> torch.Tensor:
        # Through the teacher's own call (a sharded engine gathers each layer for it).
        inner = self.teacher_module
        with torch.no_grad(), _forward_is(inner, inner.hidden_states):
            hidden = self.teacher(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
        return hidden.flatten(0, 1)  # (B*T, d_teacher)

    def _student_sums(
        self,
        transformer: Transformer,
        tokens: torch.Tensor,
        positions: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        labels: torch.Tensor,
        teacher_hidden: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KD sum, CE sum) over the target tokens; runs as the student's forward."""
        config = self.config
        hidden = transformer.hidden_states(tokens, positions=positions, doc_ids=doc_ids)
        hidden = hidden.flatten(0, 1)  # (B*T, d_student)
        weight = transformer.output_weight
        flat_labels = labels.flatten()
        # A term with weight 0 is still reported, but spends no backward.
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.kd_weight > 0):
            kd_sum = distillation_loss_sum(
                hidden,
                weight,
                teacher_hidden,
                self.teacher_weight,
                flat_labels,
                config.loss,
                config.jsd_beta,
                config.temperature,
                config.chunk_tokens,
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.kd_weight < 1):
            ce_sum = chunked_cross_entropy_sum(hidden, weight, flat_labels, config.chunk_tokens)
        return kd_sum, ce_sum

    def train_step(self, model: nn.Module, batch: Batch, global_units: int) -> StepOutput:
        transformer = unwrap(model)
        teacher_hidden = self._teacher_hidden(batch)

        def student_forward(
            tokens: torch.Tensor,
            positions: torch.Tensor | None,
            doc_ids: torch.Tensor | None,
            labels: torch.Tensor,
            teacher_hidden: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self._student_sums(
                transformer, tokens, positions, doc_ids, labels, teacher_hidden
            )

        # The losses run inside the engine's forward, as Transformer.forward's own output
        # projection does: at ZeRO-3 DeepSpeed gathers the (partitioned) output weight only
        # for parameters touched during a forward it runs.
        with _forward_is(transformer, student_forward):
            kd_sum, ce_sum = model(
                batch.input_ids, batch.positions, batch.doc_ids, batch.labels, teacher_hidden
            )
        kd_weight = self.config.kd_weight
        loss = (kd_weight * kd_sum + (1.0 - kd_weight) * ce_sum) / global_units
        metrics = {
            "loss": Metric(loss.item(), "sum"),
            "kd_loss": Metric(kd_sum.item() / global_units, "sum"),
            "ce_loss": Metric(ce_sum.item() / global_units, "sum"),
        }
        if transformer.config.n_experts:  # MoE load balancing, as in pretraining
            aux_loss = transformer.moe_aux_loss()
            loss = loss + aux_loss * (self.count_units(batch) / global_units)
            metrics["aux_loss"] = Metric(aux_loss.item(), "mean")
        tokens = batch.num_tokens
        flops = (
            self.student_flops_per_token(transformer, transformer.config)
            + self.teacher_flops_per_token
        ) * tokens
        return StepOutput(loss=loss, metrics=metrics, tokens=tokens, flops=flops)

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        """The student's next-token loss (comparable with the teacher's and pretraining's)."""
        logits = model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
        loss_sum = cross_entropy_sum(logits, batch.labels)
        return {"eval_loss": (loss_sum.item(), float(batch.num_target_tokens))}

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_sha256": self.teacher_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("teacher_sha256")
        if saved is not None and saved != self.teacher_sha256:
            raise CheckpointError(
                f"distill.teacher: its weights (sha256 {self.teacher_sha256[:12]}) are not the "
                f"ones the checkpoint was trained with ({saved[:12]}); restore that teacher or "
                "start a new run.dir"
            )
