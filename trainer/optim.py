"""AdamW with decay only on matrices, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two groups: weight matrices decay; norms, biases and embeddings do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2 or "embeddings" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups: list[dict[str, object]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # An empty group (LoRA trains matrices only) is dropped by DeepSpeed, and the scheduler
    # built on the groups would then no longer match the optimizer's.
    return [group for group in groups if group["params"]]


#: Fused AdamW on CPU too: 0.27x the time of the per-parameter loop on a 28M-parameter step
#: (docs/BENCHMARKS.md). It rounds differently from the loop (~1e-8 per update, within 1e-6 of it
#: after several steps: tests/test_optim.py); the golden curve was regenerated with it on.
CPU_FUSED = True


def adamw_implementation(model: nn.Module) -> dict[str, bool]:
    """Which torch AdamW kernel to use for where the parameters live, as AdamW keyword arguments.

    `fused` (one kernel over every parameter) on CUDA, and on CPU while CPU_FUSED; otherwise the
    per-parameter loop (`foreach` was measured slower than the loop on CPU). Fused works under DeepSpeed:
    ZeRO-0 steps this optimizer on the parameters, bf16 ZeRO-0 and ZeRO-1/2/3 on their fp32
    master partitions, which stay on the parameters' device (CPU offload uses DeepSpeedCPUAdam
    instead, see build_optimizer).
    """
    on_cuda = any(p.is_cuda for p in model.parameters())
    return {"fused": True} if on_cuda or CPU_FUSED else {"foreach": False}


def build_optimizer(
    model: nn.Module, config: TrainConfig, offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, see adamw_implementation); with ZeRO CPU offload, DeepSpeed's vectorised
    CPU Adam (AdamW mode), as it requires."""
    groups = param_groups(model, config.weight_decay)
    betas = (config.beta1, config.beta2)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=config.lr, betas=betas, eps=config.eps, adamw_mode=True)
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=betas, eps=config.eps, **adamw_implementation(model)
    )


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Factor on the peak lr for optimizer step `step` (0-based): warmup, then the schedule."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    min_ratio = config.min_lr_ratio
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "wsd":
        decay_steps = max(1, round(config.decay_fraction * config.max_steps))
        decay_start = max(config.warmup_steps, config.max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, config.max_steps - decay_start))
        return 1.0 - (1.0 - min_ratio) * progress
    progress = min(
        1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    )
    if config.schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
