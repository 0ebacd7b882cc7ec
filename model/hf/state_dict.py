"""Weight names: ours (`layers.0.attention.q_proj.weight`) <-> Hugging Face Llama-family.

Our RoPE uses the same rotate-half layout as `transformers`, so tensors move unchanged (no
q/k permutation as with Meta's original checkpoints); only names change.

MoE experts are one stacked tensor per projection on our side
(`layers.1.feed_forward.experts.gate_proj`, shape (E, hidden, dim)) and one tensor per expert
in released checkpoints, in two spellings: Mixtral (`block_sparse_moe.experts.3.w1.weight`)
and Qwen-MoE (`mlp.experts.3.gate_proj.weight`). This is the layout `save_pretrained` writes
in transformers 5 too (it fuses experts only in memory).
"""

from __future__ import annotations

import re

# (ours, theirs) for names inside one layer.
_LAYER_NAMES: tuple[tuple[str, str], ...] = (
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    *(
        (f"attention.{proj}.{kind}", f"self_attn.{proj}.{kind}")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
        for kind in ("weight", "bias")
    ),
    ("attention.q_norm.weight", "self_attn.q_norm.weight"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight"),
    *(
        (f"feed_forward.{proj}.weight", f"mlp.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj")
    ),
)
# (ours, Mixtral, Qwen-MoE) for the expert projections; ours are stacked over experts.
_EXPERT_NAMES: tuple[tuple[str, str, str], ...] = (
    ("gate_proj", "w1", "gate_proj"),
    ("up_proj", "w3", "up_proj"),
    ("down_proj", "w2", "down_proj"),
)
_ROUTER = "feed_forward.router.weight"
_MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen_moe": "mlp"}
_HF_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$"
)
_TOP_NAMES: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TO_HF = {ours: theirs for ours, theirs in _LAYER_NAMES}
_FROM_HF = {theirs: ours for ours, theirs in _LAYER_NAMES}
_TOP_TO_HF = dict(_TOP_NAMES)
_TOP_FROM_HF = {theirs: ours for ours, theirs in _TOP_NAMES}
# Buffers some exporters wrote into checkpoints; recomputed from the config, never loaded.
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def ours_to_hf_name(name: str, moe_style: str = "qwen_moe") -> str:
    """The `transformers` name of one of our (unstacked) parameters; KeyError if unknown.

    `moe_style` ("mixtral" or "qwen_moe") spells the router's name.
    """
    if name in _TOP_TO_HF:
        return _TOP_TO_HF[name]
    match = _OURS_LAYER.match(name)
    if match and match.group(2) in _TO_HF:
        return f"model.layers.{match.group(1)}.{_TO_HF[match.group(2)]}"
    if match and match.group(2) == _ROUTER:
        return f"model.layers.{match.group(1)}.{_MOE_PREFIX[moe_style]}.gate.weight"
    raise KeyError(name)


def ours_to_hf_names(
    name: str, n_experts: int, moe_style: str = "qwen_moe"
) -> list[tuple[str, int | None]]:
    """(HF name, expert index) for one of our tensors: one per expert for stacked experts,
    else [(name, None)]. KeyError for an unknown name."""
    match = _OURS_LAYER.match(name)
    if match and match.group(2).startswith("feed_forward.experts."):
        ours = match.group(2).removeprefix("feed_forward.experts.")
        for projection, mixtral, qwen in _EXPERT_NAMES:
            if ours == projection:
                theirs = mixtral if moe_style == "mixtral" else qwen
                prefix = f"model.layers.{match.group(1)}.{_MOE_PREFIX[moe_style]}.experts"
                return [(f"{prefix}.{e}.{theirs}.weight", e) for e in range(n_experts)]
    return [(ours_to_hf_name(name, moe_style), None)]


def hf_expert_slot(name: str) -> tuple[str, int] | None:
    """(our stacked name, expert index) for a per-expert HF tensor, else None."""
    match = _HF_EXPERT.match(name)
    if match is None:
        return None
    layer, prefix, expert, projection = match.groups()
    for ours, mixtral, qwen in _EXPERT_NAMES:
        if projection == (mixtral if prefix == "block_sparse_moe" else qwen):
            return f"layers.{layer}.feed_forward.experts.{ours}", int(expert)
    return None


def hf_to_ours_name(name: str) -> str | None:
    """Our name for a `transformers` tensor, None for buffers that are not weights.

    KeyError for a name we have no place for (an MoE router, an MLP bias, ...), so that no
    tensor is silently dropped.
    """
    if _IGNORED_HF.search(name):
        return None
    if name in _TOP_FROM_HF:
        return _TOP_FROM_HF[name]
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _FROM_HF:
        return f"layers.{match.group(1)}.{_FROM_HF[match.group(2)]}"
    if match and match.group(2) in ("block_sparse_moe.gate.weight", "mlp.gate.weight"):
        return f"layers.{match.group(1)}.{_ROUTER}"
    raise KeyError(name)
