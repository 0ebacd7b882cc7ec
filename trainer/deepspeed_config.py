"""The DeepSpeed JSON, generated from our typed config (never hand-written)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.config import ParallelConfig


def build_deepspeed_config(
    parallel: ParallelConfig,
    grad_clip: float,
    micro_batch_size: int,
    accumulation_steps: int,
    world_size: int,
    precision: str,
    load_universal: bool = False,
) -> dict[str, Any]:
    """DeepSpeed's config dict for a job's `parallel` section and `train.grad_clip` on
    `world_size` ranks; `load_universal` when resuming from a checkpoint converted to
    DeepSpeed's universal layout (trainer/reshard.py)."""
    overlap = (
        parallel.overlap_comm if parallel.overlap_comm is not None else torch.cuda.is_available()
    )
    zero: dict[str, Any] = {
        "stage": parallel.zero_stage,
        "overlap_comm": overlap,
        "contiguous_gradients": True,
        "reduce_bucket_size": parallel.reduce_bucket_size,
        "allgather_bucket_size": parallel.allgather_bucket_size,
    }
    if parallel.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = parallel.allgather_bucket_size
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if parallel.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if parallel.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds: dict[str, Any] = {
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def frozen_deepspeed_config(
    parallel: ParallelConfig, micro_batch_size: int, world_size: int
) -> dict[str, Any]:
    """DeepSpeed's config for a frozen, inference-only model beside the trained one (DPO's
    reference, a distillation teacher): the run's ZeRO stage, buckets and parameter offload,
    but no optimizer, no gradient clipping and no optimizer offload. fp32: a frozen model keeps
    its own dtype (DeepSpeed would cast it to the run's bf16/fp16), so its numbers do not
    depend on the stage."""
    ds = build_deepspeed_config(parallel, 0.0, micro_batch_size, 1, world_size, "fp32")
    for key in ("gradient_clipping", "zero_allow_untested_optimizer"):
        ds.pop(key)
    ds["zero_optimization"].pop("offload_optimizer", None)
    return ds
