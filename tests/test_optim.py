"""Fused AdamW (the CUDA path) gives the updates of the per-parameter loop within 1e-6."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, build_model
from trainer.config import TrainConfig
from trainer.optim import adamw_implementation, build_optimizer, build_scheduler, param_groups

CONFIG = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
TRAIN = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=6, weight_decay=0.1)


def _loop_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The previous path: AdamW one parameter at a time."""
    return torch.optim.AdamW(
        param_groups(model, TRAIN.weight_decay),
        lr=TRAIN.lr,
        betas=(TRAIN.beta1, TRAIN.beta2),
        eps=TRAIN.eps,
        foreach=False,
    )


def _train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5
) -> torch.Tensor:
    scheduler = build_scheduler(optimizer, TRAIN)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 17), generator=generator)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _fused_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The CUDA path (fused AdamW), run by torch's CPU kernel of the same algorithm."""
    return torch.optim.AdamW(
        param_groups(model, TRAIN.weight_decay),
        lr=TRAIN.lr,
        betas=(TRAIN.beta1, TRAIN.beta2),
        eps=TRAIN.eps,
        fused=True,
    )


def test_fused_updates_match_the_loop_within_1e6() -> None:
    model = build_model(CONFIG, seed=1)
    new = _train(model, _fused_optimizer(model))
    reference_model = build_model(CONFIG, seed=1)
    old = _train(reference_model, _loop_optimizer(reference_model))
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    # Negative control: a 0.1% change of the lr is visible in the same comparison.
    other = build_model(CONFIG, seed=1)
    changed = _loop_optimizer(other)
    for group in changed.param_groups:
        group["lr"] *= 1.001
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_train(other, changed), old, rtol=0, atol=1e-6)


def test_kernel_choice_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.optim

    model = build_model(CONFIG, seed=1)
    assert adamw_implementation(model) == {"fused": True}  # the golden curve's path
    assert build_optimizer(model, TRAIN).defaults["fused"] is True
    monkeypatch.setattr(trainer.optim, "CPU_FUSED", False)
    assert build_optimizer(model, TRAIN).defaults["foreach"] is False


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_deepspeed_steps_fused_adamw_like_the_loop(zero_stage: int) -> None:
    """DeepSpeed steps fused AdamW at ZeRO-0/1/2 (one rank, fp32; at ZeRO-1/2 on its flat fp32
    partitions) and the updates equal the per-parameter loop's within 1e-6."""
    from launch.environment import detect_environment
    from trainer.distributed import deepspeed, init_distributed

    init_distributed(detect_environment(), "gloo")
    ds_config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    results = []
    for make_optimizer in (_fused_optimizer, _loop_optimizer):
        model = build_model(CONFIG, seed=2)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model), config=ds_config
        )
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            tokens = torch.randint(0, 256, (2, 17), generator=generator)
            logits = engine(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
        results.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
