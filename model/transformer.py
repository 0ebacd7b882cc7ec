"""The decoder-only transformer: embeddings, blocks, final norm and the output head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.attention_paths import AttentionSpec
from model.block import TransformerBlock
from model.config import ModelConfig
from model.feed_forward import FeedForward
from model.kv_cache import KVCache
from model.masking import positions_within_documents
from model.moe.layer import MoEFeedForward
from model.norm import RMSNorm
from model.rope import rope_cos_sin


class Transformer(nn.Module):
    """Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, optional tied head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vocab_size = config.require_vocab()
        self.tok_embeddings = nn.Embedding(vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = (
            None if config.tie_embeddings else nn.Linear(config.dim, vocab_size, bias=False)
        )
        cos, sin = rope_cos_sin(
            config.max_seq_len, config.head_dim, config.rope_theta, config.rope_scaling
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # None: `attend` picks the kernel by device and need; a name forces one (tests, bench).
        self.attention_path: str | None = None

    def init_rope(self) -> None:
        """(Re)compute the RoPE tables (non-persistent buffers) on the parameters' device."""
        config = self.config
        cos, sin = rope_cos_sin(
            config.max_seq_len, config.head_dim, config.rope_theta, config.rope_scaling
        )
        device = self.tok_embeddings.weight.device
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place, on whatever device they live.

        Residual output projections get std / sqrt(2 * n_layers) so that the variance of the
        residual stream does not grow with depth (GPT-2 / OLMo scaled init).
        """
        config = self.config
        std = config.init_std
        out_std = std / math.sqrt(2 * config.n_layers)
        self.init_rope()
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)
            attn, ffn = layer.attention, layer.feed_forward
            # The dense order of draws is kept exactly as it was: the golden curve depends on it.
            dense = ffn if isinstance(ffn, FeedForward) else None
            first = [attn.q_proj, attn.k_proj, attn.v_proj]
            if dense is not None:
                first += [dense.gate_proj, dense.up_proj]
            for linear in first:
                nn.init.normal_(linear.weight, mean=0.0, std=std)
            nn.init.normal_(attn.o_proj.weight, mean=0.0, std=out_std)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            if dense is not None:
                nn.init.normal_(dense.down_proj.weight, mean=0.0, std=out_std)
            elif isinstance(ffn, MoEFeedForward):
                self._init_moe(ffn, std, out_std)
        if self.output is not None:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    @staticmethod
    def _init_moe(moe: MoEFeedForward, std: float, out_std: float) -> None:
        nn.init.normal_(moe.router.weight, mean=0.0, std=std)
        for buffer in (moe.router.expert_bias, moe.router.expert_load):
            if buffer is not None:
                nn.init.zeros_(buffer)
        nn.init.normal_(moe.experts.gate_proj, mean=0.0, std=std)
        nn.init.normal_(moe.experts.up_proj, mean=0.0, std=std)
        nn.init.normal_(moe.experts.down_proj, mean=0.0, std=out_std)
        if moe.shared_experts is not None:
            shared = moe.shared_experts
            nn.init.normal_(shared.gate_proj.weight, mean=0.0, std=std)
            nn.init.normal_(shared.up_proj.weight, mean=0.0, std=std)
            nn.init.normal_(shared.down_proj.weight, mean=0.0, std=out_std)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T); arguments as for `hidden_states`."""
        hidden = self.hidden_states(tokens, positions, kv_cache, start_pos, doc_ids)
        return F.linear(hidden, self.output_weight)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection (vocab, dim): the embedding matrix when they are tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states (B, T, dim) for tokens (B, T), before the output head.

        Losses that never materialise the full logits (chunked cross-entropy) and scalar heads
        (reward models) start from here.

        positions (B, T) are the RoPE positions, by default start_pos + arange (or the position
        inside each document when `doc_ids` is given and `reset_positions_per_document` is set).
        doc_ids (B, T), integer ids constant over each packed document, stop attention from
        crossing document boundaries.
        """
        config = self.config
        seq = tokens.shape[1]
        if start_pos + seq > config.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + seq} tokens exceeds max_seq_len={config.max_seq_len}"
            )
        if doc_ids is not None and start_pos > 0:
            raise ValueError("doc_ids are for full-sequence forwards, not cached decoding steps")
        if positions is None and doc_ids is not None and config.reset_positions_per_document:
            positions = positions_within_documents(doc_ids)
        if positions is None:
            cos = self.rope_cos[start_pos : start_pos + seq]  # (T, D)
            sin = self.rope_sin[start_pos : start_pos + seq]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D)
        spec = None
        if start_pos > 0 or config.sliding_window is not None or doc_ids is not None:
            # One description shared by every layer; plain causal attention keeps spec None.
            spec = AttentionSpec(
                seq_len=seq,
                start_pos=start_pos,
                doc_ids=doc_ids,
                global_tokens=config.global_tokens,
                force_path=self.attention_path,
            )
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, kv_cache, start_pos, spec)
        return self.norm(h)

    def moe_layers(self) -> dict[int, MoEFeedForward]:
        """The MoE feed-forwards by block index (empty for a dense model)."""
        layers: dict[int, MoEFeedForward] = {}
        for index, layer in enumerate(self.layers):
            assert isinstance(layer, TransformerBlock)
            if isinstance(layer.feed_forward, MoEFeedForward):
                layers[index] = layer.feed_forward
        return layers

    def moe_aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward (with grad); 0 if dense."""
        losses = [m.aux_loss for m in self.moe_layers().values() if m.aux_loss is not None]
        if not losses:
            return torch.zeros((), device=self.tok_embeddings.weight.device)
        return torch.stack(losses).sum()

    def moe_stats(self) -> dict[str, float]:
        """Expert load of the last forward: per layer and overall; empty for a dense model.

        `moe_imbalance_max` is the largest max/mean tokens-per-expert ratio over layers (1.0 is
        perfect balance), `moe_dropped_tokens` the token-expert assignments dropped by capacity.
        """
        stats: dict[str, float] = {}
        imbalances, dropped = [], 0
        for index, moe in self.moe_layers().items():
            if moe.tokens_per_expert is None:
                continue
            load = moe.tokens_per_expert.float()
            imbalance = float((load.max() / load.mean().clamp(min=1e-9)).item())
            imbalances.append(imbalance)
            dropped += moe.dropped_tokens
            stats[f"moe_layer{index}_imbalance"] = imbalance
            stats[f"moe_layer{index}_dropped_tokens"] = float(moe.dropped_tokens)
        if imbalances:
            stats = {
                "moe_imbalance_max": max(imbalances),
                "moe_dropped_tokens": float(dropped),
                **stats,
            }
        return stats

    def moe_tokens_per_expert(self) -> dict[str, list[int]]:
        """Tokens routed to each expert in the last forward, by layer ("layer3": [...])."""
        return {
            f"layer{index}": moe.tokens_per_expert.tolist()
            for index, moe in self.moe_layers().items()
            if moe.tokens_per_expert is not None
        }


def build_model(
    config: ModelConfig, device: str | torch.device = "cpu", seed: int = 0
) -> Transformer:
    """Build on the meta device, materialise on `device`, then initialise with `seed`.

    Building on meta first means a 70B shape can be constructed and inspected without memory;
    pass device="meta" to stop there.
    """
    with torch.device("meta"):
        model = Transformer(config)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.init_weights()
    return model
