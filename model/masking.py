"""Attention masks: causal, sliding-window and per-document, as one boolean tensor for SDPA."""

from __future__ import annotations

import torch


def attention_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    sliding_window: int | None = None,
    query_doc_ids: torch.Tensor | None = None,
    key_doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask, True where a query may attend to a key; (T, S) or (B, 1, T, S) with docs.

    Positions are indices in the (packed, cached) sequence, not RoPE positions: key j is visible
    to query i when j <= i, and, with a window W, i - j < W (the query itself and W-1 keys
    before it, the convention of Mistral and `transformers`). With document ids, keys of another
    document are hidden too, so packed documents never see each other.
    """
    query_pos = query_positions[:, None]  # (T, 1)
    key_pos = key_positions[None, :]  # (1, S)
    allowed = key_pos <= query_pos  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (query_pos - key_pos < sliding_window)
    if query_doc_ids is None or key_doc_ids is None:
        return allowed
    same_doc = query_doc_ids[:, :, None] == key_doc_ids[:, None, :]  # (B, T, S)
    return (allowed[None] & same_doc)[:, None]  # (B, 1, T, S), broadcast over heads


def positions_within_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (B, T): 0 at every document start.

    Documents are contiguous runs of equal ids, as packing produces them.
    """
    seq = doc_ids.shape[1]
    index = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # The index of the latest document start at or before each token.
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index
