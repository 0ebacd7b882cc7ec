"""Router auxiliary losses: Switch/GShard load balancing and the ST-MoE z-loss."""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs: torch.Tensor, top_experts: torch.Tensor, n_experts: int
) -> torch.Tensor:
    """E * sum_e f_e * P_e, 1.0 when routing is perfectly balanced (Switch eq. 4, GShard).

    f_e is the fraction of the N*k token-to-expert assignments that went to expert e (no
    gradient), P_e the mean router probability of e over the N tokens (probs (N, E)).
    `transformers`' Mixtral loss is k times this (it divides the counts by N, not N*k).
    """
    counts = torch.bincount(top_experts.flatten(), minlength=n_experts)  # (E,)
    fraction = counts.float() / top_experts.numel()
    mean_prob = probs.float().mean(dim=0)  # (E,)
    return n_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(router_logits)^2 (ST-MoE eq. 5): keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
