"""Pretraining: next-token cross-entropy over target tokens, with the MoE auxiliary loss."""

from __future__ import annotations

import torch
from torch import nn

from data_pipeline.batch import Batch
from model.lora import TrainedFlops
from model.transformer import Transformer
from trainer.losses.cross_entropy import chunked_cross_entropy_sum, cross_entropy_sum
from trainer.objectives.base import Metric, Objective, StepOutput


def unwrap(model: nn.Module) -> Transformer:
    """The Transformer inside a DeepSpeed engine (or the model itself)."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, Transformer), type(inner)
    return inner


class CausalLMObjective(Objective):
    """Causal language modelling; the unit is a target token (label != -100).

    The routers' auxiliary loss is a per-forward mean, so each micro-batch adds it weighted by
    its share of the step's target tokens: summed over the step it is the token-weighted mean
    (with equal micro-batches, exactly the mean over micro-batches and ranks). It is reported
    apart from the LM loss ("aux_loss"), with the expert load ("moe_*").
    """

    stage = "pretrain"

    def __init__(self, seq_len: int, chunk_tokens: int = 0) -> None:
        self.seq_len = seq_len
        self.flops_per_token = TrainedFlops(seq_len)
        # > 0: the loss comes from hidden states chunk by chunk, never the full logits.
        self.chunk_tokens = chunk_tokens

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Summed next-token cross-entropy of the batch's target tokens."""
        if self.chunk_tokens > 0:
            transformer = unwrap(model)
            hidden = transformer.hidden_states(
                batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids
            )
            return chunked_cross_entropy_sum(
                hidden, transformer.output_weight, batch.labels, self.chunk_tokens
            )
        logits = model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
        return cross_entropy_sum(logits, batch.labels)

    def count_units(self, batch: Batch) -> int:
        return batch.num_target_tokens

    def train_step(self, model: nn.Module, batch: Batch, global_units: int) -> StepOutput:
        transformer = unwrap(model)
        loss = self.loss_sum(model, batch) / global_units
        metrics = {"loss": Metric(loss.item(), "sum")}
        if transformer.config.n_experts:  # MoE load-balancing + z-loss
            aux_loss = transformer.moe_aux_loss()
            loss = loss + aux_loss * (self.count_units(batch) / global_units)
            metrics["aux_loss"] = Metric(aux_loss.item(), "mean")
            metrics |= {k: Metric(v, "max") for k, v in transformer.moe_stats().items()}
            # This rank's expert load in its last micro-batch (a histogram, not a scalar).
            metrics["moe_tokens_per_expert"] = Metric(transformer.moe_tokens_per_expert(), "last")
        tokens = batch.num_tokens
        # Forward + backward of the trained model (6N + attention per token; LoRA: 4N + 6A).
        flops = self.flops_per_token(transformer, transformer.config) * tokens
        return StepOutput(loss=loss, metrics=metrics, tokens=tokens, flops=flops)

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        loss_sum = self.loss_sum(model, batch)
        return {"eval_loss": (loss_sum.item(), float(batch.num_target_tokens))}
