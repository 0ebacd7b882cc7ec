"""The model as plain PyTorch: causality, KV cache, counts, meta build, init."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, build_model, preset_config
from model.flops import flops_per_token, param_counts
from model.generation import generate


def small(**overrides: object) -> ModelConfig:
    fields = {
        "vocab_size": 97,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 64,
    }
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_changing_a_future_token_never_changes_an_earlier_logit(kv_heads: int) -> None:
    model = build_model(small(n_kv_heads=kv_heads), seed=0).eval()
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 97
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :20], after[:, :20], rtol=0, atol=0)
    assert not torch.allclose(before[:, 20:], after[:, 20:])


@pytest.mark.parametrize("tied", [False, True])
def test_kv_cache_decoding_matches_full_forward(tied: bool) -> None:
    model = build_model(small(tie_embeddings=tied, qk_norm=True), seed=1).eval()
    prompt = [5, 17, 3, 42, 8]
    fast = generate(model, prompt, max_new_tokens=12)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert fast == sequence[len(prompt) :]


def test_sampling_is_seeded_and_top_p_restricts_choices() -> None:
    model = build_model(small(), seed=2).eval()
    a = generate(model, [1, 2, 3], 10, temperature=1.0, top_p=0.9, seed=11)
    b = generate(model, [1, 2, 3], 10, temperature=1.0, top_p=0.9, seed=11)
    assert a == b and len(a) == 10
    from model.generation import sample_next

    logits = torch.tensor([10.0, 9.0, -5.0, -5.0])
    picks = {sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(s)) for s in range(50)}
    assert picks == {0}  # token 0 alone holds > 50% of the mass


@pytest.mark.parametrize("name", ["tiny", "125M", "350M", "1B", "7B", "70B"])
def test_presets_build_on_meta_and_counts_match(name: str) -> None:
    fields = preset_config(name)
    fields.setdefault("vocab_size", 4096)
    if fields["vocab_size"] is None:
        fields["vocab_size"] = 4096
    config = ModelConfig(**fields)
    model = build_model(config, "meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == param_counts(config).total


def test_known_sizes() -> None:
    assert param_counts(ModelConfig(**preset_config("7B"))).total == 6_738_415_616  # Llama-2-7B
    assert param_counts(ModelConfig(**preset_config("70B"))).total == 70_553_706_496  # Llama-3-70B


def test_flops_per_token_formula() -> None:
    config = small()
    counts = param_counts(config)
    expected = 6 * (counts.non_embedding + 97 * 64) + 12 * 2 * 4 * 16 * 64
    assert flops_per_token(config, 64) == expected


def test_scaled_init_of_residual_projections() -> None:
    config = small(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, init_std=0.02)
    model = build_model(config, seed=3)
    layer = model.layers[0]
    assert layer.attention.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.attention.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(layer.attention_norm.weight, torch.ones(256))
    again = build_model(config, seed=3)
    assert torch.equal(again.tok_embeddings.weight, model.tok_embeddings.weight)


def test_rope_scaling_changes_only_low_frequencies() -> None:
    from model.rope import rope_inv_freq

    plain = rope_inv_freq(128, 500000.0, None)
    scaled = rope_inv_freq(128, 500000.0, {"factor": 8.0, "original_max_position_embeddings": 8192})
    assert torch.equal(plain[:8], scaled[:8])  # high frequencies untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)  # the lowest stretched by the factor
