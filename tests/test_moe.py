"""Mixture of Experts: routing and aux losses by hand, dropless = naive loop, capacity, grads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, build_model, preset_config
from model.config import ModelConfigError
from model.flops import flops_per_token, param_counts
from model.moe import (
    GroupedExperts,
    MoEFeedForward,
    TopKRouter,
    grouped_mm_offsets,
    load_balancing_loss,
    router_z_loss,
)
from model.moe.experts import padded_group_layout

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def moe_config(**overrides: object) -> ModelConfig:
    fields = {
        "vocab_size": 97,
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 64,
        "n_experts": 4,
        "top_k": 2,
        "moe_ffn_hidden_dim": 48,
    }
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def hand_router(score: str, norm: bool = True) -> tuple[TopKRouter, torch.Tensor]:
    """3 experts on dim 2; token 0 has logits [ln4, ln2, 0], token 1 [-ln2, ln3, 0]."""
    router = TopKRouter(dim=2, n_experts=3, top_k=2, score=score, norm_topk_prob=norm)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    return router, torch.tensor([[LN4, LN2], [-LN2, LN3]])


def test_softmax_router_probabilities_and_losses_by_hand() -> None:
    router, x = hand_router("softmax")
    out = router(x)
    # exp(logits) = [4, 2, 1] / 7 and [1/2, 3, 1] / 4.5
    probs = torch.tensor([[4 / 7, 2 / 7, 1 / 7], [1 / 9, 2 / 3, 2 / 9]])
    torch.testing.assert_close(out.probs, probs)
    assert out.top_experts.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(out.top_weights, torch.tensor([[2 / 3, 1 / 3], [3 / 4, 1 / 4]]))
    unnormalised, _ = hand_router("softmax", norm=False)
    torch.testing.assert_close(
        unnormalised(x).top_weights, torch.tensor([[4 / 7, 2 / 7], [2 / 3, 2 / 9]])
    )
    # 4 assignments: expert 0 once, expert 1 twice, expert 2 once.
    fraction = [1 / 4, 2 / 4, 1 / 4]
    mean_prob = [(4 / 7 + 1 / 9) / 2, (2 / 7 + 2 / 3) / 2, (1 / 7 + 2 / 9) / 2]
    expected = 3 * sum(f * p for f, p in zip(fraction, mean_prob, strict=True))
    lb = load_balancing_loss(out.probs, out.top_experts, 3)
    assert lb.item() == pytest.approx(expected, rel=1e-6)
    z = router_z_loss(out.logits)
    assert z.item() == pytest.approx((math.log(7) ** 2 + math.log(4.5) ** 2) / 2, rel=1e-6)


def test_balanced_routing_has_load_balancing_loss_one() -> None:
    probs = torch.full((4, 4), 0.25)
    top_experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert load_balancing_loss(probs, top_experts, 4).item() == pytest.approx(1.0)


def test_sigmoid_router_by_hand() -> None:
    router, x = hand_router("sigmoid")
    out = router(x)
    # sigmoid(ln4) = 4/5, sigmoid(ln2) = 2/3, sigmoid(0) = 1/2; top-2 renormalised.
    assert out.top_experts[0].tolist() == [0, 1]
    torch.testing.assert_close(out.top_weights[0], torch.tensor([6 / 11, 5 / 11]))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2))


def hand_routing(moe: MoEFeedForward, token: torch.Tensor) -> list[tuple[int, float]]:
    """(expert, weight) pairs of one token, from the router weight alone, written out: scores
    (softmax or sigmoid of w_e . x), the k largest by sorting, renormalised when configured.
    Independent of `TopKRouter.forward`, so a routing bug cannot cancel out below."""
    router = moe.router
    logits = [float(w @ token) for w in router.weight.float()]
    if router.score == "softmax":
        exps = [math.exp(v - max(logits)) for v in logits]
        scores = [v / sum(exps) for v in exps]
    else:
        scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
    chosen = sorted(range(len(scores)), key=lambda e: -scores[e])[: moe.top_k]
    total = sum(scores[e] for e in chosen) if router.norm_topk_prob else 1.0
    return [(e, scores[e] / total) for e in chosen]


def naive_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum_j w_j * expert_{e_j}(x) (+ shared experts), no sorting, no batching,
    routed by hand (`hand_routing`)."""
    tokens = x.reshape(-1, x.shape[-1])
    experts = moe.experts
    rows = []
    for t in range(tokens.shape[0]):
        row = torch.zeros(tokens.shape[1])
        for e, weight in hand_routing(moe, tokens[t]):
            hidden = F.silu(experts.gate_proj[e] @ tokens[t]) * (experts.up_proj[e] @ tokens[t])
            row = row + weight * (experts.down_proj[e] @ hidden)
        if moe.shared_experts is not None:
            shared = moe.shared_experts
            hidden = F.silu(shared.gate_proj.weight @ tokens[t]) * (
                shared.up_proj.weight @ tokens[t]
            )
            row = row + shared.down_proj.weight @ hidden
        rows.append(row)
    return torch.stack(rows).reshape(x.shape)


def built_moe(**overrides: object) -> MoEFeedForward:
    model = build_model(moe_config(**overrides), seed=3)
    moe = model.moe_layers()[0]
    return moe.eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"router_score": "sigmoid", "top_k": 3},
        {"norm_topk_prob": False, "top_k": 1},
        {"n_shared_experts": 2},
    ],
)
def test_dropless_moe_equals_naive_per_token_loop(overrides: dict[str, object]) -> None:
    moe = built_moe(**overrides)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-6, rtol=1e-5)
    assert moe.dropped_tokens == 0
    assert moe.tokens_per_expert is not None and int(moe.tokens_per_expert.sum()) == 21 * moe.top_k


def test_capacity_factor_drops_and_counts_overflow_tokens() -> None:
    moe = built_moe(top_k=1, capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 0
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    x[..., 0] = x[..., 0].abs() + 1.0
    assert moe.capacity(8) == 2  # ceil(1.0 * 8 tokens * top_1 / 4 experts)
    with torch.no_grad():
        out = moe(x)
        reference = naive_moe(moe, x)
    assert moe.tokens_per_expert is not None and moe.tokens_per_expert.tolist() == [8, 0, 0, 0]
    assert moe.dropped_tokens == 6
    torch.testing.assert_close(out[0, :2], reference[0, :2])  # the first two tokens got through
    assert torch.all(out[0, 2:] == 0)  # the rest were dropped: zero, the residual carries them


def test_gradients_reach_every_expert_that_received_tokens() -> None:
    model = build_model(moe_config(n_experts=8, top_k=2), seed=0).train()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + model.moe_aux_loss()
    loss.backward()
    for moe in model.moe_layers().values():
        assert moe.tokens_per_expert is not None
        received = moe.tokens_per_expert > 0
        assert received.any()
        for weight in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            assert weight.grad is not None
            has_grad = weight.grad.flatten(1).abs().sum(-1) > 0  # (E,)
            assert torch.equal(has_grad, received)
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_grouped_mm_offsets_and_grouped_path_match_the_loop() -> None:
    counts = torch.tensor([2, 0, 3, 1])
    assert grouped_mm_offsets(counts).tolist() == [2, 2, 5, 6]
    assert grouped_mm_offsets(counts).dtype == torch.int32
    padded, destination = padded_group_layout(counts, align=4)
    assert padded.tolist() == [4, 0, 4, 4] and grouped_mm_offsets(padded).tolist() == [4, 4, 8, 12]
    assert destination.tolist() == [0, 1, 4, 5, 6, 8]
    torch.manual_seed(0)
    experts = GroupedExperts(dim=16, hidden_dim=24, n_experts=4)
    torch.nn.init.normal_(experts.gate_proj)
    torch.nn.init.normal_(experts.up_proj)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    loop = experts(x, counts, grouped=False)
    try:
        grouped = experts(x, counts, grouped=True)
    except (RuntimeError, NotImplementedError) as exc:  # no CPU kernel in this torch build
        pytest.skip(f"torch._grouped_mm unavailable on CPU: {exc}")
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)
    grads = []
    for grouped_path in (False, True):
        experts.zero_grad()
        experts(x, counts, grouped=grouped_path).square().sum().backward()
        grads.append([p.grad.clone() for p in experts.parameters() if p.grad is not None])
    # O(1) gradients summed in another order by the grouped kernel: ~1e-4 relative apart,
    # while a routing or layout error would be O(1) apart.
    for loop_grad, grouped_grad in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(grouped_grad, loop_grad, atol=1e-4, rtol=1e-3)
    assert len(grads[1]) == 3


def test_aux_free_bias_moves_towards_balance_and_leaves_weights_unbiased() -> None:
    moe = built_moe(aux_free_bias_update_rate=0.1).train()
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    moe(x)
    assert moe.tokens_per_expert is not None and moe.router.expert_bias is not None
    load = moe.tokens_per_expert.float()
    assert moe.router.expert_bias.abs().sum() == 0  # moved by the training loop, per step
    torch.testing.assert_close(moe.router.expert_load, load)
    moe.router.update_bias()
    assert moe.router.expert_load.abs().sum() == 0
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.router.expert_bias, expected)
    moe.eval()(x)  # evaluation neither records load nor moves the bias
    torch.testing.assert_close(moe.router.expert_bias, expected)
    routed = moe.router(x.reshape(-1, 32))
    scores = routed.logits.softmax(-1).gather(-1, routed.top_experts)
    torch.testing.assert_close(routed.top_weights, scores / scores.sum(-1, keepdim=True))


def test_interleaving_counts_and_aux_loss_of_the_model() -> None:
    config = moe_config(n_layers=5, moe_every=2, first_dense_layers=2, n_shared_experts=1)
    assert [config.is_moe_layer(i) for i in range(5)] == [False, False, False, True, False]
    model = build_model(config, seed=0)
    assert list(model.moe_layers()) == [3]
    assert sum(p.numel() for p in model.parameters()) == param_counts(config).total
    counts = param_counts(config)
    expert = 3 * 32 * 48
    assert counts.total - counts.active == (4 - 2) * expert  # 2 of 4 routed experts idle
    dense = build_model(moe_config(n_experts=0), seed=0)
    assert dense.moe_aux_loss().item() == 0.0 and dense.moe_stats() == {}
    model(torch.randint(0, 97, (1, 8)))
    aux = model.moe_aux_loss()
    assert aux.requires_grad and aux.item() > 0
    stats = model.moe_stats()
    assert stats["moe_dropped_tokens"] == 0.0 and stats["moe_imbalance_max"] >= 1.0
    assert set(stats) == {
        "moe_imbalance_max",
        "moe_dropped_tokens",
        "moe_layer3_imbalance",
        "moe_layer3_dropped_tokens",
    }


def test_preset_counts_match_published_sizes() -> None:
    qwen = param_counts(ModelConfig(**preset_config("qwen3-moe-30B-A3B")))
    assert (qwen.total, qwen.active) == (30_532_122_624, 3_353_032_704)  # "30.5B, 3.3B active"
    mixtral_like = ModelConfig(**preset_config("moe-8x-1B-active"))
    assert param_counts(mixtral_like).active == 1_038_944_256
    # FLOPs follow the active parameters, not the total.
    dense_equivalent = ModelConfig(
        **{**preset_config("moe-8x-1B-active"), "n_experts": 0, "ffn_hidden_dim": 2 * 4096}
    )
    router = 16 * 8 * 2048
    assert (
        flops_per_token(mixtral_like, 4096) == flops_per_token(dense_equivalent, 4096) + 6 * router
    )


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"top_k": 5}, "top_k"),
        ({"router_score": "relu"}, "router_score"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"moe_every": 0}, "moe_every"),
        ({"first_dense_layers": 2}, "n_experts"),
        ({"z_loss_coef": -1.0}, "z_loss_coef"),
    ],
)
def test_invalid_moe_configs_name_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ModelConfigError, match=f"^{key}:"):
        moe_config(**overrides)


def test_activation_checkpointing_keeps_moe_grads_and_updates_the_bias_once() -> None:
    from trainer.parallelize import apply_activation_checkpointing

    config = moe_config(aux_free_bias_update_rate=0.01, z_loss_coef=0.001)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    grads, biases = [], []
    for checkpointed in (False, True):
        model = build_model(config, seed=0).train()
        if checkpointed:
            apply_activation_checkpointing(model, "full", 1)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        (loss + model.moe_aux_loss()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        biases.append([m.router.expert_load.clone() for m in model.moe_layers().values()])
    for plain, recomputed in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(recomputed, plain)
    for plain, recomputed in zip(biases[0], biases[1], strict=True):
        torch.testing.assert_close(recomputed, plain)  # a recompute does not record load again
