"""The CUDA attention kernels: compiled FlexAttention with a block mask, varlen flash attention.

Both read the same visibility rule as `model.masking` (causal, window, documents, global
tokens). The rule is written once as a FlexAttention `mask_mod`; on CPU it can be evaluated
densely, which is how it is tested without a GPU (flex_attention has no CPU backward in torch
2.13, so training on CPU takes the blocked path instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from model.masking import cu_seqlens

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    FLEX_AVAILABLE = True
except ImportError:  # torch < 2.5
    FLEX_AVAILABLE = False

try:
    from torch.nn.attention.varlen import varlen_attn

    VARLEN_AVAILABLE = True
except ImportError:  # torch without the varlen front-end
    VARLEN_AVAILABLE = False

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_compiled_flex: Any = None


def mask_mod(
    doc_ids: torch.Tensor | None,
    doc_positions: torch.Tensor,
    window: int | None,
    global_tokens: int,
) -> MaskMod:
    """The visibility rule as a FlexAttention mask_mod(batch, head, q_idx, kv_idx) -> bool.

    doc_positions (B|1, T): positions inside documents, deciding which keys are global.
    """

    def visible(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        allowed = kv_idx <= q_idx
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        if window is not None:
            near = q_idx - kv_idx < window
            if global_tokens > 0:
                row = b if doc_positions.shape[0] > 1 else torch.zeros_like(b)
                near = near | (doc_positions[row, kv_idx] < global_tokens)
            allowed = allowed & near
        return allowed

    return visible


def build_block_mask(
    doc_ids: torch.Tensor | None,
    doc_positions: torch.Tensor,
    window: int | None,
    global_tokens: int,
    batch: int,
    seq_len: int,
    device: torch.device,
) -> Any:
    """The FlexAttention BlockMask of the rule; built once per forward and window."""
    rule = mask_mod(doc_ids, doc_positions, window, global_tokens)
    batch_dim = batch if doc_ids is not None or doc_positions.shape[0] > 1 else None
    return create_block_mask(rule, batch_dim, None, seq_len, seq_len, device=device)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> Any:
    """Compiled flex_attention: q (B, H, T, D), k/v (B, KVH, T, D) -> (B, H, T, D)."""
    global _compiled_flex
    if _compiled_flex is None:
        # Compiled once per process: eager flex_attention materialises the scores.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def cu_seqlens_of(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, longest document) of doc_ids (B, T), for `varlen_attend`."""
    return cu_seqlens(doc_ids)


def varlen_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor, longest: int
) -> torch.Tensor:
    """Causal attention within each document by varlen flash attention -> (B, H, T, D)."""
    batch, n_heads, seq, _ = q.shape
    # (B, H, T, D) -> (B*T, H, D): the batch's documents laid end to end.
    q_flat, k_flat, v_flat = (t.transpose(1, 2).flatten(0, 1) for t in (q, k, v))
    out = varlen_attn(
        q_flat,
        k_flat,
        v_flat,
        cumulative,
        cumulative,
        longest,
        longest,
        window_size=(-1, 0),
        enable_gqa=n_heads != k.shape[1],
    )
    assert isinstance(out, torch.Tensor)
    return out.unflatten(0, (batch, seq)).transpose(1, 2)
