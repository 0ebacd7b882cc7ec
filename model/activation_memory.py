"""Activation memory per attention path: what one micro-batch's forward keeps for backward.

For `--dry-run`: the bytes the transformer blocks save for the backward pass, by attention
path, so a user sees before launching that a window at 4x the context fits (the blocked and
flash-style paths grow linearly in the sequence, the dense mask quadratically). Logits and the
loss are left out (they depend on the objective's chunking), and so are parameters.
"""

from __future__ import annotations

import math

from model import attention_paths
from model.config import ModelConfig

# Bytes of the fp32 log-sum-exp flash-style kernels keep per query and head.
_LSE_BYTES = 4


def attention_path_for(config: ModelConfig, device_type: str, documents: bool) -> str:
    """The path `model.attention_paths.attend` takes for a training forward of this model."""
    if config.sliding_window is None and not documents:
        return "causal"
    if device_type == "cuda":
        return "flex"
    return "blocked" if config.sliding_window is not None else "documents"


def activation_memory_bytes(
    config: ModelConfig,
    seq_len: int,
    micro_batch: int,
    activation_checkpointing: bool = False,
    path: str = "causal",
    dtype_bytes: int = 2,
    longest_document: int | None = None,
) -> int:
    """Bytes of activations the blocks save for backward in one micro-batch on `path`.

    Per layer: the inputs of both RMSNorms and of every projection, q/k through RoPE, v, the
    attention output and the SwiGLU intermediates, plus what the attention kernel keeps: a
    log-sum-exp for "causal"/"flex"/"varlen", the (T, T) mask (per row with documents) and
    expanded k/v heads for "dense", and the key blocks, padded queries, outputs and block masks
    of "blocked"; masks are kept as additive masks of the activations' dtype. `longest_document`
    (given when documents are packed) also bounds the blocked path's block. With activation
    checkpointing only each block's input is kept, plus one block recomputed at a time.
    """
    batch, seq = micro_batch, seq_len
    heads, kv_heads, head_dim = config.n_heads, config.kv_heads, config.head_dim
    dim, ffn = config.dim, config.ffn_dim
    tokens = batch * seq
    dense_layer = (
        tokens
        * dtype_bytes
        * (
            4 * dim  # both norms' inputs and outputs
            + 3 * (heads + kv_heads) * head_dim  # q and k before, rotated-half and after RoPE
            + kv_heads * head_dim  # v
            + heads * head_dim  # attention output (kernel and o_proj input)
            + 4 * ffn  # gate, silu(gate), up, and their product
        )
    )
    per_layer = []
    for layer in range(config.n_layers):
        window = config.layer_window(layer)
        layer_path = path
        if path == "blocked" and (window is None or window >= seq):
            # Full layers of a windowed model on CPU: per document, or plain causal.
            layer_path = "documents" if longest_document is not None else "causal"
        per_layer.append(
            dense_layer
            + _kernel_bytes(config, layer_path, window, batch, seq, dtype_bytes, longest_document)
        )
    if activation_checkpointing:
        return config.n_layers * tokens * dim * dtype_bytes + max(per_layer)
    return sum(per_layer)


def _kernel_bytes(
    config: ModelConfig,
    path: str,
    window: int | None,
    batch: int,
    seq: int,
    dtype_bytes: int,
    longest_document: int | None,
) -> int:
    heads, kv_heads, head_dim = config.n_heads, config.kv_heads, config.head_dim
    lse = batch * heads * seq * _LSE_BYTES
    if path in ("causal", "flex", "varlen"):
        return lse
    if path == "documents":
        return lse + batch * seq * heads * head_dim * dtype_bytes  # per-document outputs
    if path == "dense":
        expanded = 0 if heads == kv_heads else 2 * batch * seq * heads * head_dim * dtype_bytes
        # SDPA keeps the boolean mask as an additive one of the activations' dtype, per layer.
        mask_rows = batch if longest_document is not None else 1
        return lse + expanded + mask_rows * seq * seq * dtype_bytes
    if path != "blocked":
        raise ValueError(f"path: {path!r} is not causal, documents, flex, varlen, dense or blocked")
    block = seq if window is None else min(window, seq)
    if longest_document is not None:
        block = min(block, longest_document)
    n_blocks = math.ceil(seq / block)
    global_tokens = config.global_tokens if window is not None else 0
    keys = 2 * block + global_tokens
    # The key/value blocks and padded queries/outputs replace the plain k, v, q and output the
    # per-layer count already holds: only the excess (keys seen twice, padding) is added.
    # Split over several SDPA calls (long sequences), the concatenated output is one more copy.
    per_call = max(1, attention_paths.SCORE_BYTES_PER_CALL // (block * keys * 4))
    concatenated = batch * n_blocks > per_call
    return (
        lse
        + 2 * batch * kv_heads * head_dim * dtype_bytes * (n_blocks * keys - seq)
        + 2 * batch * heads * head_dim * dtype_bytes * (n_blocks * block - seq)
        + batch * n_blocks * block * keys * dtype_bytes  # the block mask, made additive
        + concatenated * batch * heads * head_dim * dtype_bytes * n_blocks * block
    )
