"""One interface from the model to every attention kernel: `AttentionSpec` and `attend`.

The model builds one `AttentionSpec` per forward (documents, global tokens, cache offset) and
shares it with every layer; each layer passes its own window (layer patterns alternate local
and full layers) to `attend`, which picks the path:

- "causal": no window, no documents: SDPA `is_causal` (flash on CUDA), k/v heads shared in
  place with `enable_gqa`. The plain path, bit-identical to what the model always did.
- "blocked" (CPU and any device without the kernels below): exact block-sparse attention.
  Queries are cut into blocks of the window's length; a block sees its own and the previous
  key block plus the global tokens of the document running into it, with the full visibility
  rule evaluated inside those blocks. Cost and memory O(T * W), never a (T, S) tensor.
- "documents" (CPU, documents without a window): causal SDPA over each packed document in
  turn, by the `cu_seqlens` of varlen attention; O(sum of squared document lengths), no mask.
- "flex" (CUDA): compiled FlexAttention with a block mask built once per forward and window.
- "varlen" (CUDA, fp16/bf16, documents without window or global tokens): flash attention over
  the flattened batch with `cu_seqlens`.
- "dense": an explicit (T, S) mask; only for cached decoding (start_pos > 0) and where blocking
  would cost as much as the whole square (a window or document as long as half the sequence).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from model import flex
from model.masking import attention_mask, longest_document, positions_within_documents

PATHS = ("causal", "blocked", "documents", "flex", "varlen", "dense")


@dataclass
class AttentionSpec:
    """What attention must hide in one forward, shared by all layers (built by the model).

    doc_ids (B, T) keep packed documents apart; doc_positions (B, T) are the positions inside
    each document (or the indices, without documents) that decide which keys are global.
    `force_path` overrides the choice of `attend` (benchmarks and tests).
    """

    seq_len: int
    start_pos: int = 0
    doc_ids: torch.Tensor | None = None
    global_tokens: int = 0
    force_path: str | None = None
    _doc_positions: torch.Tensor | None = field(default=None, repr=False)
    _longest_document: int | None = field(default=None, repr=False)
    _masks: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def key_len(self) -> int:
        """Keys each query row ranges over: the cached prefix and this forward's tokens."""
        return self.start_pos + self.seq_len

    def doc_positions(self, device: torch.device) -> torch.Tensor:
        """Positions inside documents (B, T), or (1, T) indices without documents."""
        if self._doc_positions is None:
            if self.doc_ids is not None:
                self._doc_positions = positions_within_documents(self.doc_ids)
            else:
                self._doc_positions = torch.arange(self.seq_len, device=device)[None]
        return self._doc_positions

    def longest_document(self) -> int:
        """The longest packed document: no visible key is further back than this."""
        if self._longest_document is None:
            self._longest_document = (
                self.seq_len if self.doc_ids is None else longest_document(self.doc_ids)
            )
        return self._longest_document

    def effective_window(self, window: int | None) -> int | None:
        """The window, or None where it hides nothing (no key is that far back)."""
        return window if window is not None and window < self.key_len else None

    def block_size(self, window: int | None) -> int:
        """Query block of the blocked path: the furthest back any local key can be."""
        limit = self.key_len
        window = self.effective_window(window)
        if window is not None:
            limit = min(limit, window)
        if self.doc_ids is not None:
            limit = min(limit, self.longest_document())
        return max(limit, 1)

    def path(self, window: int | None, device: torch.device, dtype: torch.dtype) -> str:
        """The kernel `attend` uses for a layer with this window on this device and dtype."""
        if self.force_path is not None:
            return self.force_path
        window = self.effective_window(window)
        if self.start_pos > 0:
            return "dense"
        if window is None and self.doc_ids is None:
            return "causal"
        if device.type == "cuda":
            if (
                window is None
                and dtype in (torch.float16, torch.bfloat16)
                and flex.VARLEN_AVAILABLE
            ):
                return "varlen"
            if flex.FLEX_AVAILABLE:
                return "flex"
        if window is None:
            return "documents"  # doc_ids set: each document on its own, exactly causal
        # Two blocks of keys per query block: no gain once a block spans half the sequence.
        return "blocked" if 2 * self.block_size(window) < self.seq_len else "dense"

    def dense_mask(self, window: int | None, device: torch.device) -> torch.Tensor:
        """The reference (T, S) or (B, 1, T, S) boolean mask, built once per window."""
        key = ("dense", window)
        if key not in self._masks:
            query_index = torch.arange(self.start_pos, self.key_len, device=device)
            key_index = torch.arange(self.key_len, device=device)
            doc_positions = self.doc_positions(device) if self.doc_ids is not None else None
            self._masks[key] = attention_mask(
                query_index,
                key_index,
                self.effective_window(window),
                self.doc_ids,
                self.doc_ids,
                self.global_tokens,
                doc_positions,
            )
        return self._masks[key]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec | None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention output (B, H, T, D) for q (B, H, T, D) and k, v (B, KVH, S, D).

    `spec` None is plain causal attention over k, v that are exactly the queries' prefix.
    """
    path = "causal" if spec is None else spec.path(window, q.device, q.dtype)
    gqa = q.shape[1] != k.shape[1]
    if path == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    assert spec is not None
    if path == "dense":
        mask = spec.dense_mask(window, q.device)
        if gqa:
            # An explicit mask rules flash out; expanded heads keep the memory-efficient kernel.
            repeats = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeats, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(repeats, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    effective = spec.effective_window(window)
    if path == "blocked":
        return blocked_attention(
            q,
            k,
            v,
            block=spec.block_size(window),
            window=effective,
            doc_ids=spec.doc_ids,
            doc_positions=spec.doc_positions(q.device),
            global_tokens=spec.global_tokens,
        )
    if path == "documents":
        assert spec.doc_ids is not None
        if "cu_seqlens" not in spec._masks:
            spec._masks["cu_seqlens"] = flex.cu_seqlens_of(spec.doc_ids)
        return per_document_attention(q, k, v, spec._masks["cu_seqlens"][0])
    if path == "flex":
        key = ("flex", effective)
        if key not in spec._masks:
            spec._masks[key] = flex.build_block_mask(
                spec.doc_ids,
                spec.doc_positions(q.device),
                effective,
                spec.global_tokens,
                batch=q.shape[0],
                seq_len=spec.seq_len,
                device=q.device,
            )
        return flex.flex_attend(q, k, v, spec._masks[key])
    if path == "varlen":
        assert spec.doc_ids is not None
        if "cu_seqlens" not in spec._masks:
            spec._masks["cu_seqlens"] = flex.cu_seqlens_of(spec.doc_ids)
        return flex.varlen_attend(q, k, v, *spec._masks["cu_seqlens"])
    raise ValueError(f"attention path: {path!r} is not one of {PATHS}")


def per_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor
) -> torch.Tensor:
    """Causal attention inside each document of the flattened batch, one SDPA call each.

    q (B, H, T, D), k and v (B, KVH, T, D); `cumulative` the cu_seqlens of the (B*T) tokens.
    """
    batch, n_heads, seq, _ = q.shape
    # (B, H, T, D) -> (H, B*T, D): documents laid end to end along the token axis.
    q_flat, k_flat, v_flat = (t.transpose(0, 1).flatten(1, 2) for t in (q, k, v))
    bounds = cumulative.tolist()
    outs = [
        F.scaled_dot_product_attention(
            q_flat[None, :, start:end],
            k_flat[None, :, start:end],
            v_flat[None, :, start:end],
            is_causal=True,
            enable_gqa=n_heads != k.shape[1],
        )[0]
        for start, end in itertools.pairwise(bounds)
    ]
    out = torch.cat(outs, dim=1)  # (H, B*T, D)
    return out.unflatten(1, (batch, seq)).transpose(0, 1)


#: The blocked path's SDPA calls each cover at most this many bytes of fp32 (block, keys) scores.
SCORE_BYTES_PER_CALL = 8 << 20


def _key_blocks(x: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """(B, C, T, ...) -> (B, C, n_blocks, 2*block, ...): each block's previous and own block.

    Block b holds indices [(b-1)*block, (b+1)*block); the ones outside [0, T) are zero padding.
    """
    seq = x.shape[2]
    pad = [0, 0] * (x.dim() - 3) + [block, n_blocks * block - seq]
    padded = F.pad(x, pad)  # (B, C, (n_blocks+1)*block, ...)
    blocks = padded.unflatten(2, (n_blocks + 1, block))  # (B, C, n_blocks+1, block, ...)
    return torch.cat([blocks[:, :, :-1], blocks[:, :, 1:]], dim=3)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int,
    window: int | None,
    doc_ids: torch.Tensor | None,
    doc_positions: torch.Tensor,
    global_tokens: int = 0,
) -> torch.Tensor:
    """Exact windowed/document/global attention in O(T * block) time and memory.

    q (B, H, T, D), k and v (B, KVH, T, D); `block` must be at least as long as the furthest
    visible local key (the window, or the longest document). The rule of `model.masking` is
    evaluated inside each query block against its own and the previous key block; with global
    tokens, the first `global_tokens` keys of the document running into the previous block are
    gathered as extra keys (only those before the local keys, so none counts twice).
    """
    batch, n_heads, seq, head_dim = q.shape
    n_blocks = math.ceil(seq / block)
    padded_len = n_blocks * block
    device = q.device
    docs = doc_ids if doc_ids is not None else torch.zeros(1, seq, dtype=torch.long, device=device)
    doc_pos = doc_positions.expand(docs.shape[0], seq)  # (B|1, T)

    # Queries: (B, n_blocks, H, block, D), the layout where SDPA sees heads at dim -3.
    q_blocks = F.pad(q, (0, 0, 0, padded_len - seq)).unflatten(2, (n_blocks, block))
    q_blocks = q_blocks.transpose(1, 2)
    k_blocks = _key_blocks(k, block, n_blocks).transpose(1, 2)  # (B, n_blocks, KVH, 2*block, D)
    v_blocks = _key_blocks(v, block, n_blocks).transpose(1, 2)

    block_start = torch.arange(n_blocks, device=device)[:, None] * block  # (n_blocks, 1)
    query_pos = block_start + torch.arange(block, device=device)  # (n_blocks, block)
    key_pos = block_start - block + torch.arange(2 * block, device=device)  # (n_blocks, 2*block)
    query_doc = F.pad(docs, (0, padded_len - seq)).unflatten(1, (n_blocks, block))
    key_doc = _key_blocks(docs[:, None], block, n_blocks)[:, 0]  # (B|1, n_blocks, 2*block)
    key_doc_pos = _key_blocks(doc_pos[:, None], block, n_blocks)[:, 0]

    q_pos, k_pos = query_pos[None, :, :, None], key_pos[None, :, None, :]
    visible = (k_pos <= q_pos) & (k_pos >= 0) & (k_pos < seq)  # (1, n_blocks, block, 2*block)
    visible = visible & (query_doc[..., :, None] == key_doc[..., None, :])
    if window is not None:
        near = q_pos - k_pos < window
        if global_tokens > 0:
            near = near | (key_doc_pos[..., None, :] < global_tokens)
        visible = visible & near
    # Padding queries past T see only themselves, so no softmax row is empty (no NaN anywhere).
    visible = visible | ((q_pos >= seq) & (k_pos == q_pos))

    if window is not None and global_tokens > 0:
        # The first keys of the document that runs into each block's local keys.
        local_start = (block_start[:, 0] - block).clamp(min=0)  # (n_blocks,)
        start_doc_pos = doc_pos[:, local_start]  # (B|1, n_blocks)
        offsets = torch.arange(global_tokens, device=device)
        global_index = (local_start - start_doc_pos)[..., None] + offsets  # (B|1, n_blocks, N)
        global_valid = (global_index < block_start - block) & (global_index < seq)
        global_index = global_index.clamp(max=seq - 1)
        flat_index = global_index.flatten(1)  # (B|1, n_blocks*N)
        global_doc = docs.gather(1, flat_index).unflatten(1, (n_blocks, global_tokens))
        global_doc_pos = doc_pos.gather(1, flat_index).unflatten(1, (n_blocks, global_tokens))
        global_visible = (
            global_valid[..., None, :]
            & (global_doc_pos < global_tokens)[..., None, :]
            & (query_doc[..., :, None] == global_doc[..., None, :])
        )  # (B|1, n_blocks, block, N)
        visible = torch.cat([visible, global_visible], dim=-1)  # (B|1, n_blocks, block, keys)
        index = flat_index.expand(batch, -1)[:, None, :, None].expand(-1, k.shape[1], -1, head_dim)
        k_global = k.gather(2, index).unflatten(2, (n_blocks, global_tokens)).transpose(1, 2)
        v_global = v.gather(2, index).unflatten(2, (n_blocks, global_tokens)).transpose(1, 2)
        k_blocks = torch.cat([k_blocks, k_global], dim=3)  # (B, n_blocks, KVH, 2*block+N, D)
        v_blocks = torch.cat([v_blocks, v_global], dim=3)

    # Blocks folded into the batch: SDPA's fused CPU kernel takes 4-D inputs only.
    keys = k_blocks.shape[3]
    mask = visible.expand(batch, -1, -1, -1).reshape(batch * n_blocks, 1, block, keys)
    flat = (q_blocks.flatten(0, 1), k_blocks.flatten(0, 1), v_blocks.flatten(0, 1), mask)
    # At most ~8 MiB of (block, keys) scores per SDPA call: one call over every block makes the
    # kernel's mask and score buffers grow with T past the allocator's reuse (memory-mapped
    # anew each call), and the time grew faster than T (docs/BENCHMARKS.md, attention).
    per_call = max(1, SCORE_BYTES_PER_CALL // (block * keys * 4))
    outs = [
        F.scaled_dot_product_attention(
            q_part,  # (blocks, H, block, D)
            k_part,  # (blocks, KVH, keys, D)
            v_part,
            attn_mask=mask_part,
            enable_gqa=n_heads != k.shape[1],
        )
        for q_part, k_part, v_part, mask_part in zip(
            *(x.split(per_call) for x in flat), strict=True
        )
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = out.unflatten(0, (batch, n_blocks))  # (B, n_blocks, H, block, D)
    out = out.transpose(1, 2).flatten(2, 3)  # (B, H, n_blocks*block, D)
    return out[:, :, :seq]
