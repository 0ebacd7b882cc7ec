"""Weight names: ours (`layers.0.attention.q_proj.weight`) <-> Hugging Face Llama-family.

Our RoPE uses the same rotate-half layout as `transformers`, so tensors move unchanged (no
q/k permutation as with Meta's original checkpoints); only names change.
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


def ours_to_hf_name(name: str) -> str:
    """The `transformers` name of one of our parameters; KeyError for an unknown name."""
    if name in _TOP_TO_HF:
        return _TOP_TO_HF[name]
    match = _OURS_LAYER.match(name)
    if match and match.group(2) in _TO_HF:
        return f"model.layers.{match.group(1)}.{_TO_HF[match.group(2)]}"
    raise KeyError(name)


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
    raise KeyError(name)
