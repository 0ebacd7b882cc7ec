"""Mixture of Experts: `router` (top-k gate), `experts` (grouped SwiGLU), `loss` (aux losses),
`layer` (the MoE feed-forward that puts them together)."""

from model.moe.experts import GroupedExperts, grouped_mm_offsets
from model.moe.layer import MoEFeedForward
from model.moe.loss import load_balancing_loss, router_z_loss
from model.moe.router import RouterOutput, TopKRouter

__all__ = [
    "GroupedExperts",
    "MoEFeedForward",
    "RouterOutput",
    "TopKRouter",
    "grouped_mm_offsets",
    "load_balancing_loss",
    "router_z_loss",
]
