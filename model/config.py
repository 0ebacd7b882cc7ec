"""The model's own config section: the shape of a Llama-style decoder-only transformer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ModelConfigError(ValueError):
    """A model shape that cannot be built; the message starts with the offending key."""


#: What a network's weights are and compute, as (attribute, config key): the attribute is the
#: derived value where a key may be left unset (kv_heads for a null n_kv_heads, ffn_dim for the
#: SwiGLU size rule, expert_dim), the key is what to name to the user. `model.init_from`, HF
#: imports and `scaletrain merge` all compare models on these.
NETWORK_FIELDS: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("dim", "dim"),
    ("n_layers", "n_layers"),
    ("n_heads", "n_heads"),
    ("kv_heads", "n_kv_heads"),
    ("head_dim", "head_dim"),
    ("ffn_dim", "ffn_hidden_dim"),
    ("norm_eps", "norm_eps"),
    ("rope_theta", "rope_theta"),
    ("rope_scaling", "rope_scaling"),
    ("tie_embeddings", "tie_embeddings"),
    ("qk_norm", "qk_norm"),
    ("attention_bias", "attention_bias"),
    ("attention_out_bias", "attention_out_bias"),
    ("sliding_window", "sliding_window"),
    ("sliding_window_layers", "sliding_window_layers"),
    ("global_tokens", "global_tokens"),
    ("n_experts", "n_experts"),
    ("top_k", "top_k"),
    ("expert_dim", "moe_ffn_hidden_dim"),
    ("n_shared_experts", "n_shared_experts"),
    ("router_score", "router_score"),
    ("norm_topk_prob", "norm_topk_prob"),
    ("moe_every", "moe_every"),
    ("first_dense_layers", "first_dense_layers"),
)


@dataclass
class ModelConfig:
    """Shape and numerics of the transformer; `preset` names the registry entry it came from."""

    preset: str | None = None
    init_from: str | None = None  # "hf:DIR" or a scaletrain checkpoint folder
    vocab_size: int | None = None  # None: taken from the tokenizer
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (multi-head); 1: multi-query
    head_dim: int = 0  # 0: dim // n_heads; Qwen3 and some Mistral models set it explicitly
    ffn_hidden_dim: int | None = None  # None: Llama rule from dim, multiple_of, ffn_dim_multiplier
    multiple_of: int = 64
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"type": "llama3", "factor": ...} or {"type": "yarn", "factor": ..., ...} (model/rope.py)
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3)
    attention_bias: bool = False  # biases on q/k/v projections (Qwen2)
    attention_out_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    sliding_window: int | None = None  # each query sees itself and the previous window-1 keys
    # Which layers use the window (the others attend fully); None: all, when a window is set.
    sliding_window_layers: list[int] | None = None
    # The first N tokens of each document stay visible to all its later tokens beyond the
    # window (causal global tokens, see model/masking.py).
    global_tokens: int = 0
    reset_positions_per_document: bool = False  # with doc_ids: RoPE positions restart per document
    init_std: float = 0.02
    # Mixture of Experts (model/moe). n_experts = 0 means a dense model; the rest is then unused.
    n_experts: int = 0
    top_k: int = 2  # experts per token (token-choice routing)
    moe_ffn_hidden_dim: int | None = None  # SwiGLU hidden size of each expert; None: ffn_dim
    n_shared_experts: int = 0  # always-on experts of moe_ffn_hidden_dim each, fused into one MLP
    router_score: str = "softmax"  # "softmax" or "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss (1.0 when perfectly balanced)
    z_loss_coef: float = 0.0  # router z-loss: mean(logsumexp(router_logits)^2)
    aux_free_bias_update_rate: float = 0.0  # > 0: DeepSeek-V3 per-expert selection bias
    capacity_factor: float | None = None  # None: dropless; else overflow tokens are dropped
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0 ...
    first_dense_layers: int = 0  # ... and i >= first_dense_layers
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "multiple_of"):
            if getattr(self, key) <= 0:
                raise ModelConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        if self.head_dim < 0:
            raise ModelConfigError(f"head_dim: must be positive (0: derived), got {self.head_dim}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ModelConfigError(
                    f"dim: {self.dim} is not divisible by n_heads={self.n_heads}"
                )
            # Resolved once here so every consumer (attention, RoPE, KV cache, counts) agrees.
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError(
                f"n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim: {self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelConfigError(
                f"sliding_window: must be positive or null, got {self.sliding_window}"
            )
        self._check_window()
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ModelConfigError(f"vocab_size: must be positive, got {self.vocab_size}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", "llama3")
            if kind not in ("llama3", "yarn"):
                raise ModelConfigError(
                    f"rope_scaling.type: only 'llama3' and 'yarn' are supported, got {kind!r}"
                )
            if "factor" not in self.rope_scaling:
                raise ModelConfigError("rope_scaling.factor: missing")
            if kind == "yarn" and "original_max_position_embeddings" not in self.rope_scaling:
                raise ModelConfigError(
                    "rope_scaling.original_max_position_embeddings: missing (YaRN needs the "
                    "context length the model was trained at)"
                )
        self._check_moe()

    def _check_window(self) -> None:
        if self.sliding_window_layers is not None:
            if self.sliding_window is None:
                raise ModelConfigError("sliding_window_layers: set, but sliding_window is null")
            bad = [i for i in self.sliding_window_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ModelConfigError(
                    f"sliding_window_layers: {bad} outside the {self.n_layers} layers"
                )
            self.sliding_window_layers = sorted(set(self.sliding_window_layers))
        if self.global_tokens < 0:
            raise ModelConfigError(f"global_tokens: must be >= 0, got {self.global_tokens}")
        if self.global_tokens and self.sliding_window is None:
            raise ModelConfigError(
                "global_tokens: only means something with a sliding_window (without one every "
                "token already sees its whole document)"
            )

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of block `layer_idx`, None where it attends to all its keys."""
        if self.sliding_window_layers is not None and layer_idx not in self.sliding_window_layers:
            return None
        return self.sliding_window

    @property
    def has_mixed_windows(self) -> bool:
        """Whether local (windowed) and full-attention layers alternate."""
        return len({self.layer_window(i) for i in range(self.n_layers)}) > 1

    def _check_moe(self) -> None:
        if self.n_experts < 0:
            raise ModelConfigError(f"n_experts: must be >= 0 (0: dense), got {self.n_experts}")
        if self.n_experts == 0:
            return
        if not 1 <= self.top_k <= self.n_experts:
            raise ModelConfigError(
                f"top_k: must be in [1, n_experts={self.n_experts}], got {self.top_k}"
            )
        if self.moe_ffn_hidden_dim is not None and self.moe_ffn_hidden_dim <= 0:
            raise ModelConfigError(
                f"moe_ffn_hidden_dim: must be positive or null, got {self.moe_ffn_hidden_dim}"
            )
        if self.n_shared_experts < 0:
            raise ModelConfigError(f"n_shared_experts: must be >= 0, got {self.n_shared_experts}")
        if self.router_score not in ("softmax", "sigmoid"):
            raise ModelConfigError(
                f"router_score: must be 'softmax' or 'sigmoid', got {self.router_score!r}"
            )
        for key in ("aux_loss_coef", "z_loss_coef", "aux_free_bias_update_rate"):
            if getattr(self, key) < 0:
                raise ModelConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ModelConfigError(
                f"capacity_factor: must be positive or null, got {self.capacity_factor}"
            )
        if self.moe_every <= 0:
            raise ModelConfigError(f"moe_every: must be positive, got {self.moe_every}")
        if self.first_dense_layers < 0:
            raise ModelConfigError(
                f"first_dense_layers: must be >= 0, got {self.first_dense_layers}"
            )
        if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
            raise ModelConfigError(
                f"n_experts: {self.n_experts} experts but no MoE layer among {self.n_layers} "
                f"(moe_every={self.moe_every}, first_dense_layers={self.first_dense_layers})"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` has an MoE feed-forward (Qwen3-MoE's decoder_sparse_step rule)."""
        return (
            self.n_experts > 0
            and layer_idx >= self.first_dense_layers
            and (layer_idx + 1) % self.moe_every == 0
        )

    @property
    def n_moe_layers(self) -> int:
        """How many blocks have an MoE feed-forward."""
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def expert_dim(self) -> int:
        """SwiGLU hidden size of one routed (or shared) expert."""
        return self.moe_ffn_hidden_dim if self.moe_ffn_hidden_dim is not None else self.ffn_dim

    @property
    def kv_heads(self) -> int:
        """n_kv_heads resolved (never None after __post_init__)."""
        assert self.n_kv_heads is not None
        return self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, scaled, rounded up to `multiple_of` (Llama rule)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def require_vocab(self) -> int:
        if self.vocab_size is None:
            raise ModelConfigError("vocab_size: not set and no tokenizer to take it from")
        return self.vocab_size
