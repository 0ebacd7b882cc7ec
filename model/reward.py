"""A reward model: the transformer backbone and a scalar head read at each sequence's end."""

from __future__ import annotations

import torch
from torch import nn

from model.moe.layer import MoEFeedForward
from model.transformer import Transformer


def last_token_index(pad_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real (non-pad) token of each row of pad_mask (B, T), True = pad.

    The rightmost real position, so left and right padding both work (as in transformers'
    `...ForSequenceClassification`, which takes the rightmost non-pad token).
    """
    seq = pad_mask.shape[1]
    index = torch.arange(seq, device=pad_mask.device).expand_as(pad_mask)
    return torch.where(pad_mask, -1, index).amax(dim=1).clamp(min=0)


class RewardModel(nn.Module):
    """Backbone hidden states -> `score` (Linear(dim, 1), no bias, as in HF) at the last token.

    The backbone's output (vocabulary) head is not used. State-dict names are the backbone's
    under `backbone.` plus `score.weight`.
    """

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.dim, 1, bias=False)

    def init_score(self, std: float | None = None) -> None:
        """Initialise the head (normal, std 1/sqrt(dim + 1) by default, as in TRL's reward
        trainer, so initial rewards are O(1))."""
        dim = self.backbone.config.dim
        nn.init.normal_(self.score.weight, std=std if std is not None else (dim + 1) ** -0.5)

    def moe_layers(self) -> dict[int, MoEFeedForward]:
        """The backbone's MoE layers (the loop updates their routing biases after each step)."""
        return self.backbone.moe_layers()

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) float32 for tokens (B, T); pad_mask (B, T) True at padding, any side.

        Padding is made invisible to the real tokens: pads get their own document id (so no
        real token attends to one) and positions count real tokens only, so a left-padded
        row scores the same as the right-padded one.
        """
        if pad_mask is None:
            hidden = self.backbone.hidden_states(tokens)  # (B, T, dim)
            last = torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        else:
            real = (~pad_mask).long()
            positions = (real.cumsum(dim=1) - 1).clamp(min=0)
            hidden = self.backbone.hidden_states(tokens, positions=positions, doc_ids=real)
            last = last_token_index(pad_mask)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        final = hidden[rows, last]  # (B, dim)
        return self.score(final).squeeze(-1).float()
