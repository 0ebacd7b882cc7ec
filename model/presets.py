"""The registry of named model shapes. `tiny` trains on a CPU in minutes; the rest are real sizes."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfigError

# vocab_size None means "take it from the tokenizer".
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=64, max_seq_len=512),
    # 8 experts, top-2: trains on a CPU like `tiny` (4.4M parameters, 2.0M active at vocab 4096).
    "tiny-moe": dict(
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=64,
        max_seq_len=512,
        n_experts=8,
        top_k=2,
        moe_ffn_hidden_dim=256,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    ),
    "125M": dict(
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        multiple_of=256,
        max_seq_len=2048,
        vocab_size=32000,
        tie_embeddings=True,
    ),
    "350M": dict(
        dim=1024,
        n_layers=24,
        n_heads=16,
        n_kv_heads=16,
        multiple_of=256,
        max_seq_len=2048,
        vocab_size=32000,
        tie_embeddings=True,
    ),
    "1B": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden_dim=8192,
        max_seq_len=4096,
        vocab_size=128256,
        tie_embeddings=True,
        rope_theta=500000.0,
    ),
    "7B": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        ffn_hidden_dim=11008,
        max_seq_len=4096,
        vocab_size=32000,
    ),
    "70B": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_hidden_dim=28672,
        max_seq_len=8192,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    # Mixtral-style: 8 experts top-2 in every layer, about 1.0B active of 3.5B parameters.
    "moe-8x-1B-active": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        max_seq_len=4096,
        vocab_size=32000,
        tie_embeddings=True,
        rope_theta=500000.0,
        n_experts=8,
        top_k=2,
        moe_ffn_hidden_dim=4096,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    ),
    # The shape of Qwen3-30B-A3B: 128 fine-grained experts, top-8, 30.5B total, 3.3B active.
    "qwen3-moe-30B-A3B": dict(
        dim=2048,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        head_dim=128,
        ffn_hidden_dim=6144,
        max_seq_len=40960,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        qk_norm=True,
        n_experts=128,
        top_k=8,
        moe_ffn_hidden_dim=768,
        norm_topk_prob=True,
        aux_loss_coef=0.001,
    ),
}


def preset_config(name: str) -> dict[str, Any]:
    """The ModelConfig fields of preset `name` (a fresh dict, safe to modify)."""
    if name not in PRESETS:
        raise ModelConfigError(f"preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return {"preset": name, **PRESETS[name]}
