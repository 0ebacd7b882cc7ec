"""Attention visibility rules: causal, sliding-window, per-document and global tokens.

`attention_mask` writes the rule out as one dense boolean tensor. It is the reference every
faster path is tested against, and the mask of the KV-cache decoding path; training forwards
never build it (see `model.attention_paths`).

The rule, for query i and key j (indices in the packed, cached sequence):
    visible = j <= i and same_document(i, j) and (i - j < window or doc_position(j) < global_tokens)
where doc_position(j) is j's position inside its document (its index when there are no
documents). Global tokens are the causal form of Longformer's: every token sees the first
`global_tokens` tokens of its own document in addition to its window, and a global token, being
among the first of its document, already sees everything before it. Unlike Longformer's a global
token never sees the future, so the model stays a causal language model.
"""

from __future__ import annotations

import torch


def attention_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    sliding_window: int | None = None,
    query_doc_ids: torch.Tensor | None = None,
    key_doc_ids: torch.Tensor | None = None,
    global_tokens: int = 0,
    key_doc_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask, True where a query may attend to a key; (T, S) or (B, 1, T, S) with docs.

    Positions are indices in the (packed, cached) sequence, not RoPE positions: key j is visible
    to query i when j <= i, and, with a window W, i - j < W (the query itself and W-1 keys
    before it, the convention of Mistral and `transformers`). With document ids, keys of another
    document are hidden too, so packed documents never see each other. With `global_tokens` N
    and a window, keys among the first N of their document (`key_doc_positions` (B, S), by
    default the key positions) stay visible beyond the window.
    """
    query_pos = query_positions[:, None]  # (T, 1)
    key_pos = key_positions[None, :]  # (1, S)
    allowed = key_pos <= query_pos  # (T, S)
    in_window: torch.Tensor | None = None
    if sliding_window is not None:
        in_window = query_pos - key_pos < sliding_window  # (T, S)
    if in_window is not None and global_tokens > 0:
        doc_pos = key_pos if key_doc_positions is None else key_doc_positions[:, None, :]
        in_window = in_window | (doc_pos < global_tokens)  # (T, S) or (B, T, S)
    if query_doc_ids is None or key_doc_ids is None:
        return allowed if in_window is None else allowed & in_window
    same_doc = query_doc_ids[:, :, None] == key_doc_ids[:, None, :]  # (B, T, S)
    allowed = allowed[None] & same_doc
    if in_window is not None:
        allowed = allowed & in_window
    return allowed[:, None]  # (B, 1, T, S), broadcast over heads


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


def longest_document(doc_ids: torch.Tensor) -> int:
    """Length of the longest run of equal ids over the batch (B, T) (one host sync)."""
    return int(positions_within_documents(doc_ids).max().item()) + 1


def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document boundaries of the flattened batch (B*T) and the longest document.

    The int32 `cu_seqlens` of varlen flash attention: 0, the start of every document after the
    first, B*T. A row boundary always starts a new document, even when the ids agree across it.
    """
    batch, seq = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T); column 0 starts each row
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    boundaries = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    total = torch.tensor([batch * seq], device=doc_ids.device)
    cumulative = torch.cat([boundaries, total]).to(torch.int32)
    return cumulative, int((cumulative[1:] - cumulative[:-1]).max().item())
