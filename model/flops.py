"""Analytic parameter counts and training FLOPs per token (no model needs to be built)."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a shape. `active` equals `total` for dense models."""

    total: int
    embedding: int  # input token embedding (shared with the head when tied)
    output_head: int  # the untied output projection; 0 when tied
    active: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.output_head


def param_counts(config: ModelConfig) -> ParamCounts:
    """Exact parameter counts of `Transformer(config)`."""
    vocab, dim, head_dim = config.require_vocab(), config.dim, config.head_dim
    attention = dim * head_dim * (config.n_heads * 2 + config.kv_heads * 2)
    if config.attention_bias:
        attention += head_dim * (config.n_heads + 2 * config.kv_heads)
    if config.attention_out_bias:
        attention += dim
    if config.qk_norm:
        attention += 2 * head_dim
    dense_ffn = 3 * dim * config.ffn_dim
    expert = 3 * dim * config.expert_dim  # one routed or shared SwiGLU expert
    # An MoE layer: the router (E x dim), E routed experts and the shared experts; a token
    # runs through the router, its top_k experts and the shared ones.
    shared = config.n_shared_experts * expert
    moe_total = config.n_experts * dim + config.n_experts * expert + shared
    moe_active = config.n_experts * dim + config.top_k * expert + shared
    n_moe = config.n_moe_layers
    n_dense = config.n_layers - n_moe
    per_layer = attention + 2 * dim  # two RMSNorm weights
    embedding = vocab * dim
    output_head = 0 if config.tie_embeddings else vocab * dim
    outer = embedding + output_head + dim + config.n_layers * per_layer + n_dense * dense_ffn
    total = outer + n_moe * moe_total
    active = outer + n_moe * moe_active
    return ParamCounts(total=total, embedding=embedding, output_head=output_head, active=active)


def matmul_params(config: ModelConfig, output_head: bool = True) -> int:
    """Parameters a token passes through in matrix multiplies: every active parameter but the
    input embedding lookup, plus the output head (the embedding matrix when tied) unless
    `output_head` is False (a reward model's backbone, whose head is a single score row)."""
    counts = param_counts(config)
    head = config.require_vocab() * config.dim if output_head else 0
    return counts.active - counts.embedding - counts.output_head + head


def flops_per_token(
    config: ModelConfig,
    seq_len: int,
    *,
    adapter_params: int | None = None,
    output_head: bool = True,
) -> float:
    """Training FLOPs per token, forward + backward, by the PaLM formula 6N + 12*L*H*Q*T.

    With a sliding window a query attends to at most `sliding_window` keys (plus the document's
    global tokens), so T becomes min(seq_len, sliding_window + global_tokens) in the attention
    term of each windowed layer (`sliding_window_layers`); full layers keep seq_len.
    N counts the parameters that take part in matrix multiplies (`matmul_params`).

    `adapter_params`: the base is frozen and only these adapter parameters (those a token
    passes through: model.lora.adapter_params_per_token) train, as in LoRA. The backward then
    computes gradients for the activations but none for the base weights: 4N for the base (its
    forward and the input gradients), plus 6 per adapter parameter, plus the attention term.
    """
    n_matmul = matmul_params(config, output_head)
    context = 0
    for layer in range(config.n_layers):
        window = config.layer_window(layer)
        context += seq_len if window is None else min(seq_len, window + config.global_tokens)
    attention = 12 * config.n_heads * config.head_dim * context
    if adapter_params is None:
        return float(6 * n_matmul + attention)
    return float(4 * n_matmul + 6 * adapter_params + attention)
