"""One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from model.attention import Attention
from model.attention_paths import AttentionSpec
from model.config import ModelConfig
from model.feed_forward import FeedForward
from model.kv_cache import KVCache
from model.moe.layer import MoEFeedForward
from model.norm import RMSNorm


class TransformerBlock(nn.Module):
    """Attention and a SwiGLU feed-forward (dense or MoE), each behind an RMSNorm and a residual."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, config.layer_window(layer_idx))
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward: FeedForward | MoEFeedForward = (
            MoEFeedForward(config)
            if config.is_moe_layer(layer_idx)
            else FeedForward(config.dim, config.ffn_dim)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        spec: AttentionSpec | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(
            self.attention_norm(x), cos, sin, kv_cache, self.layer_idx, start_pos, spec
        )
        return x + self.feed_forward(self.ffn_norm(x))
