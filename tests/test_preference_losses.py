"""Preference losses against independent hand-written formulas: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.batch import IGNORE_INDEX
from model import build_model
from model.config import ModelConfig
from trainer.config_io import ConfigError, from_dict
from trainer.losses.preference import bradley_terry_losses, dpo_losses, sequence_logps
from trainer.objectives.preference_config import DPOConfig, RMConfig

N = 6


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand_dpo(loss: str, *args: float) -> tuple[float, float, float]:
    """One pair in plain floats: (loss, d loss / d pc, d loss / d pr), derivatives by hand.

    args: policy chosen / rejected, reference chosen / rejected log-probs, chosen / rejected
    lengths, beta, label smoothing, SimPO gamma, SFT weight."""
    pc, pr, rc, rr, lc, lr, beta, eps, gamma, w = args
    if loss == "simpo":
        z = beta * pc / lc - beta * pr / lr - gamma
        value = -(1 - eps) * math.log(sig(z)) - eps * math.log(sig(-z))
        dz = -(1 - eps) * sig(-z) + eps * sig(z)
        d_pc, d_pr = dz * beta / lc, -dz * beta / lr
    else:
        h = (pc - rc) - (pr - rr)
        if loss == "sigmoid":
            value = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
            dh = -(1 - eps) * beta * sig(-beta * h) + eps * beta * sig(beta * h)
        elif loss == "robust":
            value = (-(1 - eps) * math.log(sig(beta * h)) + eps * math.log(sig(-beta * h))) / (
                1 - 2 * eps
            )
            dh = (-(1 - eps) * beta * sig(-beta * h) - eps * beta * sig(beta * h)) / (1 - 2 * eps)
        elif loss == "hinge":
            value = max(0.0, 1 - beta * h)
            dh = -beta if 1 - beta * h > 0 else 0.0
        else:  # ipo
            value = (h - 1 / (2 * beta)) ** 2
            dh = 2 * (h - 1 / (2 * beta))
        d_pc, d_pr = dh, -dh
    value += w * (-pc / lc)
    d_pc += -w / lc
    return value, d_pc, d_pr


def random_pairs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pc": -torch.rand(N, generator=g, dtype=torch.float64) * 40,
        "pr": -torch.rand(N, generator=g, dtype=torch.float64) * 40,
        "rc": -torch.rand(N, generator=g, dtype=torch.float64) * 40,
        "rr": -torch.rand(N, generator=g, dtype=torch.float64) * 40,
        "lc": torch.randint(1, 30, (N,), generator=g),
        "lr": torch.randint(1, 30, (N,), generator=g),
    }


CASES = [
    ("sigmoid", 0.1, 0.0, 0.0),
    ("sigmoid", 0.5, 0.2, 0.0),  # cDPO
    ("sigmoid", 0.1, 0.0, 0.7),  # with the SFT term
    ("robust", 0.3, 0.1, 0.0),
    ("hinge", 0.1, 0.0, 0.0),
    ("hinge", 0.1, 0.0, 0.3),  # both sides of the hinge among the pairs
    ("ipo", 0.1, 0.0, 0.0),
    ("simpo", 2.0, 0.0, 0.0),
    ("simpo", 2.5, 0.15, 0.5),
]


@pytest.mark.parametrize(("loss", "beta", "eps", "sft"), CASES)
def test_each_loss_value_and_gradient_match_the_formula(
    loss: str, beta: float, eps: float, sft: float
) -> None:
    pairs = random_pairs()
    gamma = 0.8
    pc = pairs["pc"].clone().requires_grad_(True)
    pr = pairs["pr"].clone().requires_grad_(True)
    out = dpo_losses(
        pc,
        pr,
        pairs["rc"],
        pairs["rr"],
        loss=loss,
        beta=beta,
        label_smoothing=eps,
        simpo_gamma=gamma,
        sft_weight=sft,
        chosen_lengths=pairs["lc"],
        rejected_lengths=pairs["lr"],
    )
    out.losses.sum().backward()
    assert pc.grad is not None and pr.grad is not None
    for i in range(N):
        args = [float(pairs[k][i]) for k in ("pc", "pr", "rc", "rr", "lc", "lr")]
        value, d_pc, d_pr = hand_dpo(loss, *args, beta, eps, gamma, sft)
        assert out.losses[i].item() == pytest.approx(value, rel=1e-10, abs=1e-12)
        assert pc.grad[i].item() == pytest.approx(d_pc, rel=1e-10, abs=1e-12)
        assert pr.grad[i].item() == pytest.approx(d_pr, rel=1e-10, abs=1e-12)
    if loss == "simpo":
        expected = beta * pairs["pc"] / pairs["lc"]
    else:
        expected = beta * (pairs["pc"] - pairs["rc"])
    torch.testing.assert_close(out.chosen_rewards, expected)
    metrics = out.metrics()
    torch.testing.assert_close(
        metrics["reward_accuracy"], (out.chosen_rewards > out.rejected_rewards).double()
    )
    if loss == "hinge" and sft > 0:  # the case meant to cover both sides of the hinge
        h = (pairs["pc"] - pairs["rc"]) - (pairs["pr"] - pairs["rr"])
        active = (1 - beta * h) > 0
        assert active.any() and not active.all()


def test_negative_control_a_wrong_formula_is_caught() -> None:
    """Dropping the reference terms, or SimPO's length normalisation, changes the numbers
    well beyond the tolerance used above."""
    pairs = random_pairs(1)
    got = dpo_losses(pairs["pc"], pairs["pr"], pairs["rc"], pairs["rr"], beta=0.1).losses
    no_reference = dpo_losses(pairs["pc"], pairs["pr"], pairs["pc"] * 0, pairs["pr"] * 0, beta=0.1)
    assert (got - no_reference.losses).abs().max() > 1e-3
    simpo = dpo_losses(
        pairs["pc"],
        pairs["pr"],
        None,
        None,
        loss="simpo",
        beta=2.0,
        chosen_lengths=pairs["lc"],
        rejected_lengths=pairs["lr"],
    ).losses
    unnormalised = dpo_losses(
        pairs["pc"],
        pairs["pr"],
        None,
        None,
        loss="simpo",
        beta=2.0,
        chosen_lengths=torch.ones(N),
        rejected_lengths=torch.ones(N),
    ).losses
    assert (simpo - unnormalised).abs().max() > 1e-3


def tiny_model() -> torch.nn.Module:
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32)
    return build_model(config, seed=3).eval()


def test_sequence_logps_sum_completion_tokens_only() -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (3, 12), generator=g)
    labels = torch.randint(0, 64, (3, 12), generator=g)
    labels[:, :5] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(tokens)
        logps, counts = sequence_logps(logits, labels)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    for row in range(3):
        total = sum(
            log_probs[row, t, labels[row, t]].item()
            for t in range(12)
            if labels[row, t] != IGNORE_INDEX
        )
        assert logps[row].item() == pytest.approx(total, abs=1e-4)
    assert counts.tolist() == [7, 4, 7]


@pytest.mark.parametrize(("loss", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.3), ("robust", 0.2)])
def test_dpo_loss_is_ln2_when_policy_is_the_reference(loss: str, eps: float) -> None:
    policy, reference = tiny_model(), tiny_model()  # same seed: the same weights
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (4, 16), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, :6] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    logps, _ = sequence_logps(policy(tokens), labels)
    with torch.no_grad():
        ref, _ = sequence_logps(reference(tokens), labels)
    out = dpo_losses(
        logps[:2], logps[2:], ref[:2], ref[2:], loss=loss, beta=0.1, label_smoothing=eps
    )
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2)), atol=1e-6, rtol=0)
    assert out.metrics()["reward_margin"].abs().max() < 1e-6
    # Negative control: a different reference moves the loss off ln 2.
    other = build_model(reference.config, seed=4)
    with torch.no_grad():
        ref_other, _ = sequence_logps(other(tokens), labels)
    moved = dpo_losses(logps[:2], logps[2:], ref_other[:2], ref_other[2:], loss=loss, beta=0.1)
    assert (moved.losses - math.log(2)).abs().max() > 1e-4


def test_bradley_terry_loss_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    rc = torch.randn(N, generator=g, dtype=torch.float64).requires_grad_(True)
    rr = torch.randn(N, generator=g, dtype=torch.float64).requires_grad_(True)
    margins = torch.rand(N, generator=g, dtype=torch.float64)
    coef = 0.05
    out = bradley_terry_losses(rc, rr, margins, center_coef=coef)
    out.losses.sum().backward()
    assert rc.grad is not None and rr.grad is not None
    for i in range(N):
        c, r, m = rc[i].item(), rr[i].item(), margins[i].item()
        d = c - r - m
        assert out.losses[i].item() == pytest.approx(
            -math.log(sig(d)) + coef * (c + r) ** 2, rel=1e-12
        )
        assert rc.grad[i].item() == pytest.approx(-sig(-d) + 2 * coef * (c + r), rel=1e-10)
        assert rr.grad[i].item() == pytest.approx(sig(-d) + 2 * coef * (c + r), rel=1e-10)
    metrics = out.metrics()
    assert metrics["reward_accuracy"].tolist() == [
        float(c > r) for c, r in zip(rc, rr, strict=True)
    ]
    plain = bradley_terry_losses(rc.detach(), rr.detach())
    assert (plain.losses - out.losses).abs().max() > 1e-3  # margins and centering matter


def test_config_validation_names_the_key() -> None:
    assert DPOConfig().uses_reference and not DPOConfig(loss="simpo").uses_reference
    bad = [
        ({"loss": "kto"}, "dpo.loss"),
        ({"beta": 0}, "dpo.beta"),
        ({"label_smoothing": 0.5}, "dpo.label_smoothing"),
        ({"loss": "ipo", "label_smoothing": 0.1}, "dpo.label_smoothing"),
        ({"loss": "simpo", "reference": "runs/x"}, "dpo.reference"),
        ({"loss": "simpo", "precompute_reference": True}, "dpo.precompute_reference"),
        ({"sft_weight": -1}, "dpo.sft_weight"),
        ({"simpo_gamma": -0.1}, "dpo.simpo_gamma"),
    ]
    for values, key in bad:
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            from_dict(DPOConfig, values, "dpo")
    with pytest.raises(ConfigError, match=r"^rm.center_coef:"):
        from_dict(RMConfig, {"center_coef": -1}, "rm")
    assert from_dict(RMConfig, {"margin": True}, "rm").margin
