"""Token-choice top-k routing: each token picks its k highest-scoring experts."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RouterOutput(NamedTuple):
    """What one routing decision produces, for N tokens and E experts.

    A NamedTuple, not a dataclass: ZeRO-3 must see the tensors a module returns to hook them
    (it re-gathers the router weight in backward when their gradient arrives).
    """

    logits: torch.Tensor  # (N, E) fp32 router logits (for the z-loss)
    probs: torch.Tensor  # (N, E) fp32 per-token distribution over experts (for the aux loss)
    top_weights: torch.Tensor  # (N, k) fp32 weights that scale each chosen expert's output
    top_experts: torch.Tensor  # (N, k) int64 chosen expert ids


class TopKRouter(nn.Module):
    """A linear gate scoring every expert, then top-k selection per token.

    Scores are softmax (Mixtral, Qwen3-MoE) or sigmoid (DeepSeek-V3) of the logits, in fp32.
    With `norm_topk_prob` the k chosen scores are renormalised to sum to one. With
    `bias_update_rate > 0` a per-expert bias (a buffer, not a parameter) is added to the scores
    for *selection only* (auxiliary-loss-free balancing, DeepSeek-V3 section 2.1.2); the weights
    stay unbiased. Training forwards add their load to `expert_load`; the training loop calls
    `update_bias()` once per optimizer step (after summing the load over data-parallel ranks, so
    every rank moves its bias identically, by the load of the whole global batch). Keeping the
    bias fixed inside a step keeps the routing of a forward and of its recomputation under
    activation checkpointing identical, and makes it independent of the micro-batch split.
    """

    def __init__(
        self,
        dim: int,
        n_experts: int,
        top_k: int,
        score: str = "softmax",
        norm_topk_prob: bool = True,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.score, self.norm_topk_prob = score, norm_topk_prob
        self.bias_update_rate = bias_update_rate
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.expert_bias: torch.Tensor | None
        self.expert_load: torch.Tensor | None
        if bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
            # Token-expert assignments since the last bias update (saved: resumes exactly).
            self.register_buffer("expert_load", torch.zeros(n_experts, dtype=torch.float32))
        else:
            self.expert_bias = self.expert_load = None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens x (N, dim)."""
        logits = F.linear(x, self.weight).float()  # (N, E)
        if self.score == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        if self.expert_bias is None:
            top_weights, top_experts = torch.topk(scores, self.top_k, dim=-1)  # (N, k)
        else:
            _, top_experts = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)
            top_weights = scores.gather(-1, top_experts)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, top_weights, top_experts)

    @torch.no_grad()
    def record_load(self, tokens_per_expert: torch.Tensor) -> None:
        """Add one training forward's load (E,) to the pending bias update."""
        if self.expert_load is not None:
            self.expert_load += tokens_per_expert.float()

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += rate * sign(mean load - load) for the pending load, then clear it:
        underloaded experts become likelier picks."""
        if self.expert_bias is None or self.expert_load is None or not self.expert_load.any():
            return
        load = self.expert_load
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()
