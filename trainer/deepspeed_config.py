"""The DeepSpeed JSON, generated from our typed config (never hand-written)."""

from __future__ import annotations

from typing import Any

from trainer.config import JobConfig


def build_deepspeed_config(
    config: JobConfig,
    micro_batch_size: int,
    accumulation_steps: int,
    world_size: int,
    precision: str,
) -> dict[str, Any]:
    """DeepSpeed's config dict for this job on `world_size` ranks."""
    zero: dict[str, Any] = {
        "stage": config.parallel.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if config.parallel.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if config.parallel.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds: dict[str, Any] = {
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": config.train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}
    return ds
