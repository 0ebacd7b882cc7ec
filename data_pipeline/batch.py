"""The typed micro-batch every training stage hands to the loop.

The data side builds it completely: labels are already aligned with the inputs (label t is the
target of input t, -100 where no loss is taken), and document ids / positions are given by the
packer that knows where conversations or documents start. The loop never shifts labels nor
derives document ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from data_pipeline.packing import document_segments

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One micro-batch of B rows of T tokens.

    input_ids (B, T) long; labels (B, T) long, IGNORE_INDEX where no loss is taken.
    doc_ids (B, T), optional: attention never crosses a change of id (packed documents or
      conversations); None means one document per row.
    positions (B, T), optional: RoPE positions (restarting per document in packed rows).
    pad_mask (B, T) bool, optional: True at padding. Padding is never counted as work.
    num_pairs: for preference data, rows [0, num_pairs) are the chosen and
      [num_pairs, 2 * num_pairs) the rejected completions of the same prompts; 0 otherwise.
    extras: per-row tensors a stage needs (margins, cached reference log-probs, example ids).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    pad_mask: torch.Tensor | None = None
    num_pairs: int = 0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and labels "
                f"{tuple(self.labels.shape)} differ in shape"
            )

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in the batch (the work done, for `tokens` and `tokens_per_s`)."""
        if self.pad_mask is None:
            return int(self.input_ids.numel())
        return int((~self.pad_mask).sum().item())

    @property
    def num_target_tokens(self) -> int:
        """Positions that carry a loss (labels != IGNORE_INDEX)."""
        return int((self.labels != IGNORE_INDEX).sum().item())

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on `device` (non-blocking where the source is pinned)."""

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            doc_ids=move(self.doc_ids),
            positions=move(self.positions),
            pad_mask=move(self.pad_mask),
            extras={k: v.to(device, non_blocking=True) for k, v in self.extras.items()},
        )


def causal_lm_batch(
    sequences: torch.Tensor,
    eos_id: int | None = None,
    document_masking: bool = False,
) -> Batch:
    """A pretraining batch from packed rows of T + 1 tokens: inputs and next-token labels.

    With `document_masking`, documents are the runs ended by `eos_id` (the packer puts one EOS
    after each document), so attention and positions restart after every EOS.
    """
    inputs = sequences[:, :-1].contiguous()
    labels = sequences[:, 1:].contiguous()
    doc_ids = None
    if document_masking:
        if eos_id is None:
            raise ValueError("document masking needs the tokenizer's EOS id")
        doc_ids = document_segments(inputs, eos_id)[0]
    return Batch(input_ids=inputs, labels=labels, doc_ids=doc_ids)
