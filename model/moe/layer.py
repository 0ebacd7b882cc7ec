"""The MoE feed-forward: route, sort tokens by expert, run the experts, weight and scatter back."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from model.config import ModelConfig
from model.feed_forward import FeedForward
from model.moe.experts import GroupedExperts
from model.moe.loss import load_balancing_loss, router_z_loss
from model.moe.router import TopKRouter


class ExpertDispatcher(Protocol):
    """Runs `experts` on expert-sorted rows somewhere else (e.g. on the ranks that own them).

    Called as dispatcher(experts, rows, tokens_per_expert) in place of
    experts(rows, tokens_per_expert); returns the rows' outputs in the same order.
    """

    def __call__(
        self, experts: GroupedExperts, rows: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor: ...


class MoEFeedForward(nn.Module):
    """Drop-in replacement for `FeedForward` in MoE blocks.

    Dropless by default: every token reaches its k experts. With `capacity_factor` each expert
    takes at most ceil(capacity_factor * N * k / E) assignments per forward, earliest tokens
    first; the rest are dropped (they contribute zero; the residual carries the token) and
    counted. After each forward the layer keeps its auxiliary loss (`aux_loss`, with grad) and
    its load (`tokens_per_expert`, `dropped_tokens`) for the model to collect.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.capacity_factor = config.capacity_factor
        self.aux_loss_coef, self.z_loss_coef = config.aux_loss_coef, config.z_loss_coef
        self.router = TopKRouter(
            config.dim,
            config.n_experts,
            config.top_k,
            config.router_score,
            config.norm_topk_prob,
            config.aux_free_bias_update_rate,
        )
        self.experts = GroupedExperts(config.dim, config.expert_dim, config.n_experts)
        self.shared_experts = (
            FeedForward(config.dim, config.n_shared_experts * config.expert_dim)
            if config.n_shared_experts > 0
            else None
        )
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None  # (E,) assignments before dropping
        self.dropped_tokens = 0
        # None computes every expert here; expert parallelism (trainer/expert_parallel.py) sets
        # a dispatcher that sends rows to the ranks owning their experts and brings outputs back.
        self.dispatcher: ExpertDispatcher | None = None

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert accepts for n_tokens tokens; None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, dim)
        # Activation checkpointing reruns this forward inside backward: it must not record its
        # loss and load a second time (the routing is the same: the bias moves between steps).
        recomputing = torch._C._current_graph_task_id() != -1
        record = self.training and not recomputing
        routed = self.router(tokens)
        flat_experts = routed.top_experts.flatten()  # (N*k,) assignment a -> token a // k
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.n_experts)  # (E,)
        # Stable sort keeps token order inside each expert, so capacity drops the latest tokens.
        order = torch.argsort(flat_experts, stable=True)  # (N*k,) assignments by expert
        kept_per_expert = tokens_per_expert
        capacity = self.capacity(tokens.shape[0])
        if capacity is not None:
            starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert  # (E,)
            rank_in_expert = (
                torch.arange(order.numel(), device=x.device) - starts[flat_experts[order]]
            )
            order = order[rank_in_expert < capacity]
            kept_per_expert = tokens_per_expert.clamp(max=capacity)
        token_index = order // self.top_k  # (M,) source token of each sorted row
        rows = tokens[token_index]  # (M, dim) sorted by expert
        if self.dispatcher is None:
            expert_out = self.experts(rows, kept_per_expert)  # (M, dim)
        else:
            expert_out = self.dispatcher(self.experts, rows, kept_per_expert)
        weights = routed.top_weights.flatten()[order].unsqueeze(-1)  # (M, 1) fp32
        weighted = (expert_out * weights).to(tokens.dtype)
        out = torch.zeros_like(tokens).index_add_(0, token_index, weighted)  # (N, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)

        aux_loss = self.aux_loss_coef * load_balancing_loss(
            routed.probs, routed.top_experts, self.n_experts
        ) + self.z_loss_coef * router_z_loss(routed.logits)
        if not recomputing:
            self.aux_loss = aux_loss
            self.tokens_per_expert = tokens_per_expert.detach()
            self.dropped_tokens = int(flat_experts.numel() - order.numel())
        if record:
            self.router.record_load(tokens_per_expert)
        return out.reshape(shape)
