"""The model as plain PyTorch: causality, KV cache, counts, meta build, init."""

from __future__ import annotations

from typing import Any

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


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_sdpa_enable_gqa_matches_expanded_kv_heads(kv_heads: int) -> None:
    """SDPA's own GQA (no k/v copies) computes what repeat_interleave'd heads compute."""
    model = build_model(small(n_kv_heads=kv_heads), seed=3).double().eval()
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        native = model(tokens)  # the causal path: enable_gqa
        # The dense path expands k/v heads with repeat_interleave; a window as long as the
        # sequence hides nothing, so only the kernel differs.
        model.config.sliding_window = 24
        model.attention_path = "dense"
        expanded = model(tokens)
    torch.testing.assert_close(native, expanded, rtol=1e-12, atol=1e-12)


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
    # Any stop id ends the generation (kept as the last token); others do not.
    third = fast[2]
    stopped = generate(model, prompt, max_new_tokens=12, stop_ids=[10**6, third])
    assert stopped == fast[: fast.index(third) + 1]


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


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_bias": True},
        {"attention_bias": True, "attention_out_bias": True, "qk_norm": True},
        {"head_dim": 32, "qk_norm": True},  # head_dim * n_heads != dim, as in Qwen3
        {"sliding_window": 8, "tie_embeddings": True},
    ],
)
def test_attention_variants_build_count_and_decode(overrides: dict) -> None:
    config = small(**overrides)
    model = build_model(config, seed=4).eval()
    assert sum(p.numel() for p in model.parameters()) == param_counts(config).total
    prompt = [5, 17, 3, 42, 8, 9, 11, 2, 60, 33]
    fast = generate(model, prompt, max_new_tokens=12)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert fast == sequence[len(prompt) :]


def test_sliding_window_hides_keys_older_than_the_window() -> None:
    window = 6
    model = build_model(small(sliding_window=window, n_layers=1), seed=5).eval()
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 97
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    # With one layer, position 3 is seen by queries 3..3+window-1 and by no later one.
    assert not torch.allclose(before[0, 3 : 3 + window], after[0, 3 : 3 + window])
    torch.testing.assert_close(before[0, 3 + window :], after[0, 3 + window :], rtol=0, atol=0)
    # A window at least as long as the sequence is plain causal attention.
    full = build_model(small(sliding_window=None, n_layers=1), seed=5).eval()
    wide = build_model(small(sliding_window=24, n_layers=1), seed=5).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(tokens), full(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reset_positions", [True, False])
def test_packed_documents_do_not_see_each_other(reset_positions: bool) -> None:
    model = build_model(small(reset_positions_per_document=reset_positions), seed=6).eval()
    generator = torch.Generator().manual_seed(2)
    first = torch.randint(0, 97, (1, 11), generator=generator)
    second = torch.randint(0, 97, (1, 17), generator=generator)
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 11 + [1] * 17])
    with torch.no_grad():
        packed_logits = model(packed, doc_ids=doc_ids)
        alone_first, alone_second = model(first), model(second)
    torch.testing.assert_close(packed_logits[:, :11], alone_first, rtol=1e-5, atol=1e-5)
    if reset_positions:
        torch.testing.assert_close(packed_logits[:, 11:], alone_second, rtol=1e-5, atol=1e-5)
    else:
        # RoPE is relative, so only float rounding separates a shifted document from itself.
        torch.testing.assert_close(packed_logits[:, 11:], alone_second, rtol=1e-4, atol=1e-4)
        assert not torch.equal(packed_logits[:, 11:], alone_second)


def test_positions_restart_per_document() -> None:
    from model.masking import positions_within_documents

    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(positions_within_documents(doc_ids), expected)


def test_flops_attention_term_uses_the_window() -> None:
    dense, sliding = small(), small(sliding_window=16)
    assert param_counts(dense) == param_counts(sliding)
    assert flops_per_token(dense, 64) - flops_per_token(sliding, 64) == 12 * 2 * 4 * 16 * (64 - 16)
    assert flops_per_token(sliding, 8) == flops_per_token(dense, 8)
    # One local layer of two; global tokens add keys to it.
    mixed = small(sliding_window=16, sliding_window_layers=[1], global_tokens=4)
    assert flops_per_token(dense, 64) - flops_per_token(mixed, 64) == 12 * 4 * 16 * (64 - 20)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
        {"mscale": 1.0, "mscale_all_dim": 0.5},
        {"attention_factor": 0.9},
    ],
)
def test_yarn_matches_transformers(extra: dict[str, Any]) -> None:
    """YaRN frequencies, attention factor and cos/sin tables equal transformers' own."""
    transformers = pytest.importorskip("transformers")
    from model.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq

    rope = {"factor": 8.0, "original_max_position_embeddings": 32, **extra}
    hf_config = transformers.LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **rope},
    )
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    scaling = {"type": "yarn", **rope}
    torch.testing.assert_close(rope_inv_freq(32, 10000.0, scaling), rotary.inv_freq)
    assert rope_attention_factor(scaling) == pytest.approx(rotary.attention_scaling, rel=1e-12)
    positions = torch.arange(256)[None]
    cos_hf, sin_hf = rotary(torch.zeros(1, 256, 32), positions)
    cos, sin = rope_cos_sin(256, 32, 10000.0, scaling)
    torch.testing.assert_close(cos, cos_hf[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(sin, sin_hf[0], rtol=0, atol=2e-6)
    # Negative control: without the scaling the long positions rotate differently.
    plain_cos, _ = rope_cos_sin(256, 32, 10000.0, None)
    assert (plain_cos - cos_hf[0]).abs().max() > 0.1
