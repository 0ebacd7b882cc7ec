"""Preference losses as plain tensor math: the DPO family and the Bradley-Terry reward loss.

Everything here works on per-sequence numbers (summed completion log-probs, scalar rewards)
and returns *per-pair* values: the objective sums them over its micro-batch and divides by
the global pair count of the optimizer step, so a step's gradient does not depend on how it
is split into micro-batches and ranks.

Conventions: a "pair" is (chosen, rejected) for one prompt; `logps` are log pi(y | x) summed
over the completion tokens only; `beta` is the KL-penalty strength of DPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from data_pipeline.batch import IGNORE_INDEX

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo"]
DPO_LOSSES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "simpo")
REFERENCE_FREE_LOSSES: tuple[str, ...] = ("simpo",)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(label) over positions whose label is not IGNORE_INDEX, in fp32.

    logits (B, T, V), labels (B, T) already aligned (label t is the target of input t).
    Returns (logps (B,) float32, token_counts (B,) long); the counts are the completion
    lengths used for length normalisation (SimPO, the SFT term).
    """
    mask = labels != IGNORE_INDEX
    # cross_entropy never materialises a second (B, T, V) log-softmax tensor.
    token_nll = F.cross_entropy(
        logits.float().flatten(0, 1),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)  # (B, T), 0 where ignored
    return -(token_nll * mask).sum(dim=1), mask.sum(dim=1)


@dataclass
class PairLosses:
    """Per-pair results of a preference loss; every tensor is (n_pairs,).

    losses carries the gradient; the rewards are detached (metrics only).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """Per-pair metric values (sum them and divide by the global pair count):
        chosen_reward, rejected_reward, reward_accuracy, reward_margin."""
        return {
            "chosen_reward": self.chosen_rewards,
            "rejected_reward": self.rejected_rewards,
            "reward_accuracy": (self.chosen_rewards > self.rejected_rewards).to(
                self.chosen_rewards.dtype
            ),
            "reward_margin": self.chosen_rewards - self.rejected_rewards,
        }


def dpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    *,
    loss: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    sft_weight: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PairLosses:
    """Per-pair losses of the DPO family. With h = (pi_c - pi_r) - (ref_c - ref_r), the
    difference of policy and reference log-ratios, and eps = label_smoothing:

    - sigmoid: DPO (Rafailov et al. 2023, eq. 7), -log sigma(beta h); with eps > 0 the
      conservative cDPO of Mitchell (2023): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    - robust: robust DPO (Chowdhury et al. 2024, eq. 8), the unbiased loss under label noise eps:
      ((1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))) / (1 - 2 eps).
    - hinge: SLiC-HF's calibration loss (Zhao et al. 2023) on the log-ratios, max(0, 1 - beta h).
    - ipo: IPO (Azar et al. 2023, eq. 17), (h - 1 / (2 beta))^2, on summed log-probs.
    - simpo: SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:
      -log sigma(beta pi_c / |y_c| - beta pi_r / |y_r| - gamma), label-smoothed like cDPO.

    Rewards are beta (pi - ref) (DPO's implicit reward, eq. 5), or beta pi / |y| for SimPO.
    `sft_weight` > 0 adds sft_weight * (-pi_c / |y_c|), the per-token NLL of the chosen
    completion (RPO, Pang et al. 2024). Lengths are completion token counts; they are needed
    for simpo and for the SFT term.
    """
    if loss not in DPO_LOSSES:
        raise ValueError(f"dpo.loss: must be one of {', '.join(DPO_LOSSES)}, got {loss!r}")
    needs_lengths = loss == "simpo" or sft_weight > 0
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"dpo.loss {loss!r} with sft_weight={sft_weight} needs the lengths")
    eps = label_smoothing
    if loss == "simpo":
        assert chosen_lengths is not None and rejected_lengths is not None
        chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
        rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
        z = chosen_rewards - rejected_rewards - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    else:
        if reference_chosen_logps is None or reference_rejected_logps is None:
            raise ValueError(f"dpo.loss {loss!r} needs reference log-probs")
        chosen_ratio = policy_chosen_logps - reference_chosen_logps
        rejected_ratio = policy_rejected_logps - reference_rejected_logps
        h = chosen_ratio - rejected_ratio
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        if loss == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
                1 - 2 * eps
            )
        elif loss == "hinge":
            losses = torch.relu(1 - beta * h)
        else:  # ipo
            losses = (h - 1 / (2 * beta)) ** 2
    if sft_weight > 0:
        assert chosen_lengths is not None
        losses = losses + sft_weight * (-policy_chosen_logps / chosen_lengths.clamp(min=1))
    return PairLosses(losses, chosen_rewards.detach(), rejected_rewards.detach())


def bradley_terry_losses(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margins: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> PairLosses:
    """Per-pair reward-model loss: -log sigma(r_c - r_r - m) + center_coef (r_c + r_r)^2.

    The Bradley-Terry likelihood of the preference (Ouyang et al. 2022, eq. 1); the margin m
    is Llama 2's (Touvron et al. 2023, eq. 2), a per-pair preference strength (0 when None);
    the centering term (Eisenstein et al. 2023) keeps rewards near zero mean, which the loss
    alone leaves free. Its mean over pairs is mean((r_c + r_r)^2).
    """
    diff = chosen_rewards - rejected_rewards
    if margins is not None:
        diff = diff - margins
    losses = -F.logsigmoid(diff)
    if center_coef > 0:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return PairLosses(losses, chosen_rewards.detach(), rejected_rewards.detach())
