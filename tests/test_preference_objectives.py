"""DPO and reward objectives: ln 2 at step 0, accumulation invariance, cached == live reference."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from data_pipeline.preference import collate_pairs, parse_preference_record, tokenize_examples
from data_pipeline.sources import SkipCounter
from model import build_model
from model.config import ModelConfig
from model.reward import RewardModel
from tests.test_preference_cache import RECORDS
from tests.test_preference_data import TemplateRenderer, chat_tokenizer
from trainer import reference_cache as rc
from trainer.objectives.preference import DPOObjective, RewardObjective
from trainer.objectives.preference_config import DPOConfig, RMConfig


@pytest.fixture(scope="module")
def data() -> tuple[Any, ...]:
    tokenizer = chat_tokenizer()
    records = [{**r, "margin": float(i)} for i, r in enumerate(RECORDS)]
    examples = [(f"r:{i}", parse_preference_record(r)) for i, r in enumerate(records)]
    pairs = tokenize_examples(
        examples, TemplateRenderer(tokenizer), 64, "error", SkipCounter(strict=True)
    )
    config = ModelConfig(
        vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1
    )
    return config, pairs, tokenizer.pad_token_id


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss", ["sigmoid", "robust"])
def test_first_dpo_step_is_ln2_and_cache_equals_live(data: Any, loss: str) -> None:
    config, pairs, pad_id = data
    policy, reference = build_model(config, seed=1), build_model(config, seed=1)
    objective = DPOObjective(DPOConfig(loss=loss, label_smoothing=0.1), reference)
    batch = collate_pairs(pairs, pad_id)
    out = objective.train_step(policy, batch, global_units=4)
    assert out.metrics["dpo_loss"].value == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["reward_margin"].value == pytest.approx(0.0, abs=1e-6)
    # A trained-away policy: cached reference log-probs give the loss of the live reference.
    moved = build_model(config, seed=2)
    live = objective.train_step(moved, batch, global_units=4)
    assert abs(live.metrics["dpo_loss"].value - math.log(2)) > 1e-3
    cached = rc.compute_reference_logps(reference, [batch], len(pairs))
    no_reference = DPOObjective(DPOConfig(loss=loss, label_smoothing=0.1))
    from_cache = no_reference.train_step(moved, rc.attach_reference_logps(batch, *cached), 4)
    torch.testing.assert_close(from_cache.loss, live.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", ["dpo", "simpo", "rm"])
def test_two_micro_batches_give_the_gradient_of_one(data: Any, stage: str) -> None:
    config, pairs, pad_id = data
    if stage == "rm":
        model: torch.nn.Module = RewardModel(build_model(config, seed=3))
        model.init_score()
        objective: Any = RewardObjective(RMConfig(margin=True, center_coef=0.1))
    else:
        model = build_model(config, seed=3)
        dpo = (
            DPOConfig(loss="sigmoid", sft_weight=0.5) if stage == "dpo" else DPOConfig(loss="simpo")
        )
        objective = DPOObjective(dpo, build_model(config, seed=4) if stage == "dpo" else None)
    whole = collate_pairs(pairs, pad_id)
    objective.train_step(model, whole, 4).loss.backward()
    expected = grads(model)
    model.zero_grad()
    metrics: dict[str, float] = {}
    for part in (pairs[:1], pairs[1:]):  # unequal micro-batches, different padding
        out = objective.train_step(model, collate_pairs(part, pad_id), 4)
        out.loss.backward()
        for name, metric in out.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + metric.value
    for got, want in zip(grads(model), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    whole_metrics = objective.train_step(model, whole, 4).metrics
    for name, metric in whole_metrics.items():
        assert metrics[name] == pytest.approx(metric.value, abs=1e-5), name
    # Negative control: a per-micro-batch mean (the classic accumulation bug) differs.
    model.zero_grad()
    for part in (pairs[:1], pairs[1:]):
        objective.train_step(model, collate_pairs(part, pad_id), len(part)).loss.backward()
    assert any((g - w).abs().max() > 1e-4 for g, w in zip(grads(model), expected, strict=True))


def test_flops_price_the_reference_forward_and_drop_the_reward_models_vocab_head(
    data: Any,
) -> None:
    """DPO: the policy's training FLOPs per token, plus a forward (a third of 6N + attention)
    with a live reference, none from a cache; with LoRA the policy's part is the frozen base's
    4N + 6 per adapter parameter. A reward model: the backbone without its vocabulary head."""
    from model.flops import flops_per_token
    from model.lora import LoRAConfig, apply_lora, trained_flops_per_token

    config, pairs, pad_id = data
    seq = 64
    batch = collate_pairs(pairs, pad_id)
    full, forward = flops_per_token(config, seq), flops_per_token(config, seq) / 3
    policy = build_model(config, seed=1)
    live = DPOObjective(DPOConfig(), build_model(config, seed=1), seq_len=seq)
    assert live.train_step(policy, batch, 4).flops == pytest.approx(
        (full + forward) * batch.num_tokens, rel=1e-12
    )
    cached = rc.compute_reference_logps(build_model(config, seed=1), [batch], len(pairs))
    from_cache = DPOObjective(DPOConfig(), seq_len=seq)
    out = from_cache.train_step(policy, rc.attach_reference_logps(batch, *cached), 4)
    assert out.flops == pytest.approx(full * batch.num_tokens, rel=1e-12)
    apply_lora(policy, LoRAConfig(rank=4, alpha=8.0))
    lora = trained_flops_per_token(policy, config, seq)
    assert lora < full
    # A fresh objective: one prices its model once (adapters do not change while it trains).
    live = DPOObjective(DPOConfig(), build_model(config, seed=1), seq_len=seq)
    assert live.train_step(policy, batch, 4).flops == pytest.approx(
        (lora + forward) * batch.num_tokens, rel=1e-12
    )

    reward = RewardModel(build_model(config, seed=3))
    reward.init_score()
    out = RewardObjective(RMConfig(), seq_len=seq).train_step(reward, batch, 4)
    head = 6 * config.require_vocab() * config.dim
    assert out.flops == pytest.approx((full - head) * batch.num_tokens, rel=1e-12)
