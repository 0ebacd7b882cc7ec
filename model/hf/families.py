"""The registry of Hugging Face architectures: what each config can express, both directions.

A family is data, not code: which attention features its `config.json` can describe and under
which keys. Converting reads the shared keys (sizes, RoPE, norm eps, tying) once, then lets the
family's flags decide the rest. A new dense family is one more `HFFamily(...)` entry; an MoE
family also names its `moe_style` (Mixtral: every layer sparse, renormalised top-k; Qwen-MoE:
`decoder_sparse_step`, `mlp_only_layers`, `norm_topk_prob`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from model.config import ModelConfig, ModelConfigError


class HFFormatError(ModelConfigError):
    """A Hugging Face folder or config we cannot convert; the message names the file or key."""


@dataclass(frozen=True)
class HFFamily:
    """One `*ForCausalLM` architecture of `transformers` and the features its config expresses.

    qkv_bias: "flag" (q/k/v/o biases all follow `attention_bias`, Llama/Qwen3), "always" (q/k/v
    biased and o not, whatever the config says, Qwen2) or "never" (Mistral).
    sliding: "never", "global" (`sliding_window` applies to every layer, Mistral), or
    "layer_types" (`use_sliding_window` + per-layer `layer_types`, Qwen2/Qwen3, which carry a
    mix of sliding and full layers as our `sliding_window_layers`).
    rope_types: the `rope_type`s besides "default" its config can carry ("llama3", "yarn").
    No family carries global tokens.
    """

    architecture: str
    model_type: str
    qkv_bias: Literal["flag", "always", "never"]
    qk_norm: bool
    sliding: Literal["never", "global", "layer_types"]
    rope_types: tuple[str, ...]
    extra_hf_keys: dict[str, Any] = field(default_factory=dict)  # written as-is on export
    moe_style: Literal["none", "mixtral", "qwen_moe"] = "none"

    def check_exportable(self, config: ModelConfig) -> None:
        """Raise HFFormatError naming the first feature of `config` this family cannot hold."""
        problems = []
        if config.qk_norm != self.qk_norm:
            problems.append(f"qk_norm={config.qk_norm}")
        if self.qkv_bias == "flag" and config.attention_bias != config.attention_out_bias:
            problems.append("attention_bias without attention_out_bias (or the reverse)")
        if self.qkv_bias == "always" and not (
            config.attention_bias and not config.attention_out_bias
        ):
            problems.append(
                f"attention_bias={config.attention_bias}, "
                f"attention_out_bias={config.attention_out_bias} (needs q/k/v bias only)"
            )
        if self.qkv_bias == "never" and (config.attention_bias or config.attention_out_bias):
            problems.append("attention biases")
        if self.sliding == "never" and config.sliding_window is not None:
            problems.append(f"sliding_window={config.sliding_window}")
        if self.sliding == "global" and config.has_mixed_windows:
            problems.append("a mix of sliding-window and full-attention layers")
        if config.global_tokens:
            problems.append(f"global_tokens={config.global_tokens}")
        if config.rope_scaling is not None:
            rope_type = config.rope_scaling.get("type", "llama3")
            if rope_type not in self.rope_types:
                problems.append(f"rope_scaling of type {rope_type!r}")
        if self.model_type == "qwen2" and config.head_dim * config.n_heads != config.dim:
            problems.append(f"head_dim={config.head_dim} != dim / n_heads")
        problems += self._moe_problems(config)
        if problems:
            raise HFFormatError(
                f"architecture: {self.architecture} cannot express {problems[0]}; "
                f"pick another with --arch ({', '.join(FAMILIES)})"
            )

    def _moe_problems(self, config: ModelConfig) -> list[str]:
        if self.moe_style == "none":
            return [f"n_experts={config.n_experts} (MoE)"] if config.n_experts else []
        if not config.n_experts:
            return ["a dense model (n_experts=0)"]
        problems = []
        if config.router_score != "softmax":
            problems.append(f"router_score={config.router_score!r}")
        if config.n_shared_experts:
            problems.append(f"n_shared_experts={config.n_shared_experts}")
        if config.aux_free_bias_update_rate:
            problems.append("aux_free_bias_update_rate (a per-expert routing bias)")
        if config.capacity_factor is not None:
            problems.append(f"capacity_factor={config.capacity_factor} (it routes dropless)")
        if self.moe_style == "mixtral":
            if not config.norm_topk_prob:
                problems.append("norm_topk_prob=False")
            if config.n_moe_layers != config.n_layers:
                problems.append("dense layers among MoE layers")
        return problems

    def _moe_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        # transformers' balance loss is top_k times ours (it divides counts by N, not N*k).
        coef = config.aux_loss_coef / config.top_k
        if self.moe_style == "mixtral":
            return {
                "intermediate_size": config.expert_dim,
                "num_local_experts": config.n_experts,
                "num_experts_per_tok": config.top_k,
                "router_aux_loss_coef": coef,
                "router_jitter_noise": 0.0,
                "output_router_logits": False,
            }
        return {
            "moe_intermediate_size": config.expert_dim,
            "num_experts": config.n_experts,
            "num_experts_per_tok": config.top_k,
            "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": config.moe_every,
            "mlp_only_layers": list(range(config.first_dense_layers)),
            "router_aux_loss_coef": coef,
            "output_router_logits": False,
        }

    def _moe_from_hf(self, hf: dict[str, Any], where: str) -> dict[str, Any]:
        """Our MoE fields for a config.json of this family ({} for a dense family)."""
        if self.moe_style == "none":
            return {}
        n_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
        top_k = int(hf.get("num_experts_per_tok") or 2)
        coef = float(hf.get("router_aux_loss_coef") or 0.0) * top_k
        if self.moe_style == "mixtral":
            return {
                "n_experts": int(n_experts),
                "top_k": top_k,
                "moe_ffn_hidden_dim": int(hf["intermediate_size"]),
                "norm_topk_prob": True,
                "aux_loss_coef": coef,
            }
        n_layers = int(hf["num_hidden_layers"])
        dense = sorted(int(i) for i in hf.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))):
            raise HFFormatError(
                f"{where}: mlp_only_layers: only a prefix of dense layers is supported, got {dense}"
            )
        fields = {
            "n_experts": int(n_experts),
            "top_k": top_k,
            "moe_ffn_hidden_dim": int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            "aux_loss_coef": coef,
            "moe_every": int(hf.get("decoder_sparse_step") or 1),
            "first_dense_layers": min(len(dense), n_layers),
        }
        return fields

    def to_hf_config(self, config: ModelConfig, dtype: str) -> dict[str, Any]:
        """The `config.json` of `config` as this architecture (our config must be exportable)."""
        self.check_exportable(config)
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
        if config.rope_scaling is not None:
            rope = {"rope_theta": config.rope_theta, **_rope_scaling_to_hf(config.rope_scaling)}
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": config.require_vocab(),
            "hidden_size": config.dim,
            "intermediate_size": config.ffn_dim,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_seq_len,
            "rms_norm_eps": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
            "rope_parameters": rope,
            # transformers 4.x reads these two instead of rope_parameters; 5.x accepts both.
            "rope_theta": config.rope_theta,
            "initializer_range": config.init_std,
            "attention_dropout": 0.0,
            "use_cache": True,
            "dtype": dtype,
        }
        if config.rope_scaling is not None:
            hf["rope_scaling"] = _rope_scaling_to_hf(config.rope_scaling)
        if self.qkv_bias == "flag":
            hf["attention_bias"] = config.attention_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        if self.sliding == "global":
            hf["sliding_window"] = config.sliding_window
        elif self.sliding == "layer_types":
            windows = [config.layer_window(i) for i in range(config.n_layers)]
            hf["use_sliding_window"] = config.sliding_window is not None
            hf["sliding_window"] = config.sliding_window
            hf["layer_types"] = [
                "full_attention" if w is None else "sliding_attention" for w in windows
            ]
            # Read only when layer_types is absent: the leading full layers (Qwen2's rule).
            leading_full = next((i for i, w in enumerate(windows) if w is not None), len(windows))
            hf["max_window_layers"] = leading_full
        if self.moe_style != "none":
            hf.update(self._moe_to_hf(config))
        hf.update(self.extra_hf_keys)
        return hf

    def from_hf_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        """Our ModelConfig for a `config.json` of this architecture; `where` names the file."""

        def get(key: str, default: Any = None) -> Any:
            return hf[key] if hf.get(key) is not None else default

        def require(key: str) -> Any:
            if hf.get(key) is None:
                raise HFFormatError(f"{where}: {key}: missing")
            return hf[key]

        if get("hidden_act", "silu") not in ("silu", "swish"):
            raise HFFormatError(
                f"{where}: hidden_act: only silu is supported, got {hf['hidden_act']!r}"
            )
        if get("mlp_bias", False):
            raise HFFormatError(f"{where}: mlp_bias: biased MLPs are not supported")
        n_heads = int(require("num_attention_heads"))
        dim = int(require("hidden_size"))
        theta, scaling = _rope_from_hf(hf, where, self.rope_types)
        attention_bias = attention_out_bias = False
        if self.qkv_bias == "flag":
            attention_bias = attention_out_bias = bool(get("attention_bias", False))
        elif self.qkv_bias == "always":
            attention_bias = True
        window, window_layers = None, None
        if self.sliding == "global":
            window = get("sliding_window")
        elif self.sliding == "layer_types" and get("use_sliding_window", False):
            n_layers = int(require("num_hidden_layers"))
            layer_types = get("layer_types") or [
                "sliding_attention" if i >= int(get("max_window_layers", 0)) else "full_attention"
                for i in range(n_layers)
            ]
            unknown = set(layer_types) - {"sliding_attention", "full_attention"}
            if unknown or len(layer_types) != n_layers:
                raise HFFormatError(
                    f"{where}: layer_types: expected {n_layers} of 'sliding_attention' or "
                    f"'full_attention', got {layer_types}"
                )
            sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
            if sliding and get("sliding_window") is not None:
                window = get("sliding_window")
                window_layers = None if len(sliding) == n_layers else sliding
        try:
            return ModelConfig(
                vocab_size=int(require("vocab_size")),
                dim=dim,
                n_layers=int(require("num_hidden_layers")),
                n_heads=n_heads,
                n_kv_heads=int(get("num_key_value_heads", n_heads)),
                head_dim=int(get("head_dim", 0)),
                ffn_hidden_dim=int(require("intermediate_size")),
                norm_eps=float(get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_seq_len=int(get("max_position_embeddings", 2048)),
                tie_embeddings=bool(get("tie_word_embeddings", False)),
                qk_norm=self.qk_norm,
                attention_bias=attention_bias,
                attention_out_bias=attention_out_bias,
                sliding_window=None if window is None else int(window),
                sliding_window_layers=window_layers,
                init_std=float(get("initializer_range", 0.02)),
                **self._moe_from_hf(hf, where),
            )
        except ModelConfigError as exc:
            raise HFFormatError(f"{where}: {exc}") from None


_YARN_KEYS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def _rope_scaling_to_hf(scaling: dict[str, Any]) -> dict[str, Any]:
    if scaling.get("type", "llama3") == "yarn":
        hf = {
            "rope_type": "yarn",
            "factor": float(scaling["factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
        hf.update({key: scaling[key] for key in _YARN_KEYS if scaling.get(key) is not None})
        return hf
    return {
        "rope_type": "llama3",
        "factor": float(scaling["factor"]),
        "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": int(
            scaling.get("original_max_position_embeddings", 8192)
        ),
    }


def _rope_from_hf(
    hf: dict[str, Any], where: str, rope_types: tuple[str, ...]
) -> tuple[float, dict[str, Any] | None]:
    """(theta, our rope_scaling) from `rope_parameters` (transformers 5) or the 4.x keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    source = params if params.get("rope_type", "default") != "default" else legacy
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type == "default" or not source:
        return theta, None
    if rope_type not in rope_types:
        supported = ", ".join(repr(t) for t in ("default", *rope_types))
        raise HFFormatError(
            f"{where}: rope_parameters.rope_type: only {supported} are supported here, "
            f"got {rope_type!r}"
        )
    if rope_type == "yarn":
        original = source.get("original_max_position_embeddings")
        if original is None:
            # transformers' own fallback: the trained context is the extended one / factor.
            original = int(hf["max_position_embeddings"] / float(source["factor"]))
        yarn: dict[str, Any] = {
            "type": "yarn",
            "factor": float(source["factor"]),
            "original_max_position_embeddings": int(original),
        }
        yarn.update({key: source[key] for key in _YARN_KEYS if source.get(key) is not None})
        return theta, yarn
    scaling = {
        "type": "llama3",
        "factor": float(source["factor"]),
        "low_freq_factor": float(source.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(source.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": int(
            source.get("original_max_position_embeddings", 8192)
        ),
    }
    return theta, scaling


FAMILIES: dict[str, HFFamily] = {
    family.architecture: family
    for family in (
        HFFamily("LlamaForCausalLM", "llama", "flag", False, "never", ("llama3", "yarn")),
        HFFamily("MistralForCausalLM", "mistral", "never", False, "global", ()),
        HFFamily("Qwen2ForCausalLM", "qwen2", "always", False, "layer_types", ("yarn",)),
        HFFamily("Qwen3ForCausalLM", "qwen3", "flag", True, "layer_types", ("yarn",)),
        HFFamily(
            "MixtralForCausalLM", "mixtral", "never", False, "global", (), moe_style="mixtral"
        ),
        HFFamily(
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            "flag",
            True,
            "layer_types",
            ("yarn",),
            moe_style="qwen_moe",
        ),
    )
}


def family_of(hf: dict[str, Any], where: str) -> HFFamily:
    """The registry entry for a `config.json` (by `architectures`, else `model_type`)."""
    for architecture in hf.get("architectures") or []:
        if architecture in FAMILIES:
            return FAMILIES[architecture]
    for family in FAMILIES.values():
        if family.model_type == hf.get("model_type"):
            return family
    named = hf.get("architectures") or hf.get("model_type")
    raise HFFormatError(
        f"{where}: architectures: {named} is not supported (supported: {', '.join(FAMILIES)})"
    )


def family_for(config: ModelConfig, architecture: str | None = None) -> HFFamily:
    """The family to export `config` as: `architecture` if named, else the plainest that fits.

    Llama when nothing else is needed; Qwen3 for QK-norm, Qwen2 for q/k/v-only biases,
    Mistral for a sliding window.
    """
    if architecture is not None:
        matches = [f for f in FAMILIES.values() if architecture in (f.architecture, f.model_type)]
        if not matches:
            raise HFFormatError(
                f"--arch: {architecture!r} is not supported (supported: {', '.join(FAMILIES)})"
            )
        matches[0].check_exportable(config)
        return matches[0]
    errors = []
    for family in FAMILIES.values():
        try:
            family.check_exportable(config)
            return family
        except HFFormatError as exc:
            errors.append(str(exc))
    raise HFFormatError(f"model: no supported architecture fits this model ({errors[0]})")
