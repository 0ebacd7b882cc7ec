"""Grouped-query self-attention: projections, QK-norm and RoPE around one attention kernel.

What attention hides (window, documents, global tokens) is described once per forward by the
model's `AttentionSpec`; `model.attention_paths.attend` picks the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.attention_paths import AttentionSpec, attend
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.norm import RMSNorm
from model.rope import apply_rope

#: Attention over this rank's slice of a sequence split across ranks: q (B, T, H, D), k and v
#: (B, T, KVH, D), RoPE applied, with the forward's spec and the layer's window -> (B, T, H, D).
#: Set from outside (trainer/sequence_parallel.py); the model itself never sets it.
SequenceParallelAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec | None, int | None], torch.Tensor
]


class Attention(nn.Module):
    """Causal multi-head attention with n_kv_heads <= n_heads shared key/value heads (GQA/MQA).

    Optional q/k/v and output biases (Qwen2, Llama `attention_bias`) and per-head QK RMSNorm
    applied before RoPE, in the order of Qwen3: project, norm each head, rotate.
    """

    def __init__(self, config: ModelConfig, window: int | None = None) -> None:
        super().__init__()
        self.window = window  # this layer's sliding window (None: full causal attention)
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(
            self.n_heads * self.head_dim, config.dim, bias=config.attention_out_bias
        )
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        # The seam of sequence parallelism: None on one device (and in cached decoding).
        self.sequence_parallel: SequenceParallelAttention | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        start_pos: int = 0,
        spec: AttentionSpec | None = None,
    ) -> torch.Tensor:
        """Attend over x (B, T, dim) under `spec` and this layer's window.

        With no spec the keys must be exactly the queries' causal prefix (no cached keys before
        them) and the layer has no window: plain causal attention.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)  # (B, T, KVH, D)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, cos, sin)
        if self.sequence_parallel is not None and kv_cache is None:
            # x is this rank's slice of the sequence; the keys live on the other ranks too.
            out = self.sequence_parallel(q, k, v, spec, self.window)  # (B, T, H, D)
            return self.o_proj(out.reshape(batch, seq, self.n_heads * self.head_dim))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|KVH, T, D)

        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, start_pos, k, v)  # (B, KVH, S, D), S = start_pos + T
        if spec is None and self.window is not None:
            spec = AttentionSpec(seq_len=seq, start_pos=start_pos)
        out = attend(q, k, v, spec, self.window)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)
