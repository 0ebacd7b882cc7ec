"""Grouped-query self-attention through `scaled_dot_product_attention`.

The mask (causal, sliding-window, per-document) is built once per forward by the model, see
`model.masking`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kv_cache import KVCache
from model.norm import RMSNorm
from model.rope import apply_rope


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


# SDPA reads shared key/value heads in place with `enable_gqa` (torch >= 2.5), but only its
# flash and math kernels accept it; with an explicit mask (which rules flash out) k/v are
# expanded instead, so the memory-efficient kernel stays available on CUDA.
SDPA_ENABLE_GQA = _torch_at_least(2, 5)


class Attention(nn.Module):
    """Causal multi-head attention with n_kv_heads <= n_heads shared key/value heads (GQA/MQA).

    Optional q/k/v and output biases (Qwen2, Llama `attention_bias`) and per-head QK RMSNorm
    applied before RoPE, in the order of Qwen3: project, norm each head, rotate.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        start_pos: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over x (B, T, dim); `mask` (True = visible) replaces the plain causal mask.

        With no mask the keys must be exactly the queries' causal prefix (no cached keys before
        them), so SDPA's `is_causal` fast path applies; the model builds a mask otherwise.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)  # (B, T, KVH, D)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|KVH, T, D)

        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, start_pos, k, v)  # (B, KVH, S, D), S = start_pos + T
        gqa: dict[str, bool] = {}
        if self.n_kv_heads != self.n_heads:
            if SDPA_ENABLE_GQA and mask is None:
                gqa["enable_gqa"] = True  # SDPA maps each group of query heads to its k/v head
            else:
                repeats = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(repeats, dim=1)  # (B, H, S, D)
                v = v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)
