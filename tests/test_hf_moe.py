"""Ours vs theirs for the MoE families: Mixtral and Qwen3-MoE, import, export, generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import ModelConfig  # noqa: E402
from model.generation import generate  # noqa: E402
from model.hf import (  # noqa: E402
    HFFolder,
    HFFormatError,
    family_for,
    load_hf_model,
    save_model_as_hf,
)
from tests.test_hf_interop import COMMON, VOCAB, tokens  # noqa: E402

MOE_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "mixtral-top1-sliding": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 3, "num_experts_per_tok": 1, "sliding_window": 7},
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "norm_topk_prob": True,
            "head_dim": 32,
        },
    ),
    "qwen3-moe-dense-first-unnormalised": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_hidden_layers": 4,
            "num_experts": 6,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "norm_topk_prob": False,
            "mlp_only_layers": [0],
            "decoder_sparse_step": 1,
        },
    ),
    "qwen3-moe-every-2nd": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 2,
            "num_hidden_layers": 4,
        },
    ),
}


def hf_moe_model(case: str, seed: int = 0) -> Any:
    config_cls, model_cls, extra = MOE_CASES[case]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        # Qwen3-MoE starts its router at zero (all experts tie); norms start at one.
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("gate.weight"):
                param.add_(torch.randn_like(param) * 0.3)
    return model


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_import_matches_transformers(case: str, tmp_path: Path) -> None:
    theirs = hf_moe_model(case)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    assert ours.config.n_experts == MOE_CASES[case][2].get(
        "num_experts", MOE_CASES[case][2].get("num_local_experts")
    )
    batch = tokens()
    with torch.no_grad():
        expected = theirs(batch).logits
        got = ours(batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_routing_matters_at_these_sizes(tmp_path: Path) -> None:
    """Negative control: the same weights with experts shuffled are far off."""
    theirs = hf_moe_model("qwen3-moe")
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    batch = tokens()
    with torch.no_grad():
        expected = theirs(batch).logits
        for moe in ours.moe_layers().values():
            moe.experts.gate_proj.copy_(moe.experts.gate_proj.roll(1, dims=0))
        assert (ours(batch) - expected).abs().max() > 0.1


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_export_loads_in_transformers_and_matches(case: str, tmp_path: Path) -> None:
    theirs = hf_moe_model(case, seed=2)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    architecture = MOE_CASES[case][1]
    family = save_model_as_hf(ours, tmp_path / "export", architecture)
    assert family.architecture == architecture
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", attn_implementation="eager"
    ).eval()
    assert type(reloaded).__name__ == architecture
    batch = tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, ours(batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(batch).logits, theirs(batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["mixtral", "qwen3-moe-dense-first-unnormalised"])
def test_moe_greedy_generation_is_identical(case: str, tmp_path: Path) -> None:
    theirs = hf_moe_model(case, seed=4)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    save_model_as_hf(ours, tmp_path / "export", MOE_CASES[case][1])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", attn_implementation="eager"
    ).eval()
    prompt = tokens(batch=1, seq=6, seed=5)[0].tolist()
    new_tokens = 16
    ours_ids = generate(ours, prompt, max_new_tokens=new_tokens)
    with torch.no_grad():
        for model in (theirs, reloaded):
            theirs_ids = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
            assert ours_ids == theirs_ids


def test_moe_families_are_picked_and_refuse_what_they_cannot_hold() -> None:
    def config(**overrides: Any) -> ModelConfig:
        fields = {"vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 4, "n_experts": 4}
        return ModelConfig(**{**fields, **overrides})

    assert family_for(config()).architecture == "MixtralForCausalLM"
    assert family_for(config(qk_norm=True)).architecture == "Qwen3MoeForCausalLM"
    assert (
        family_for(config(first_dense_layers=1, qk_norm=True), "qwen3_moe").moe_style == "qwen_moe"
    )
    assert family_for(config(n_experts=0)).architecture == "LlamaForCausalLM"
    for overrides, problem in [
        ({"n_shared_experts": 1}, "n_shared_experts"),
        ({"router_score": "sigmoid"}, "router_score"),
        ({"capacity_factor": 1.25}, "capacity_factor"),
        ({"aux_free_bias_update_rate": 1e-3}, "aux_free_bias_update_rate"),
        ({"first_dense_layers": 1}, "dense layers"),
    ]:
        with pytest.raises(HFFormatError, match=f"MixtralForCausalLM cannot express {problem}"):
            family_for(config(**overrides), "mixtral")


def test_moe_folder_errors_name_the_tensor_or_key(tmp_path: Path) -> None:
    theirs = hf_moe_model("qwen3-moe")
    theirs.save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "mlp_only_layers": [1]}))
    with pytest.raises(HFFormatError, match=r"mlp_only_layers: only a prefix"):
        HFFolder(tmp_path / "hf").model_config()
    fewer = {k: v for k, v in config.items() if k not in ("num_experts", "num_local_experts")}
    config_path.write_text(json.dumps({**fewer, "num_experts": 3}))
    with pytest.raises(HFFormatError, match=r"experts\.3\..*not used by this config"):
        load_hf_model(HFFolder(tmp_path / "hf"))
