"""Frozen models beside the trained one (DPO's reference, a distillation teacher): whole on
every rank, or sharded.

At ZeRO 0-2 a frozen model is a plain module, a whole replica on every rank. At ZeRO-3 it
goes through `deepspeed.initialize` without an optimizer, with the run's ZeRO-3 settings
(trainer/deepspeed_config.py `frozen_deepspeed_config`): DeepSpeed partitions its parameters
over the ranks (each rank keeps 1/world of every parameter; those under DeepSpeed's
persistence threshold, 1e5 elements by default, stay gathered after their first use) and
gathers each module's parameters for its forward, then frees them again. There is no
optimizer state and no gradient, and the engine is never saved: it is in no checkpoint.

Every forward of a sharded model is a collective: all ranks must run the same number of
forwards, with the same modules, or the gathers wait for a rank that never comes.
"""

from __future__ import annotations

import logging
from typing import cast

from torch import nn

from trainer.config import JobConfig
from trainer.deepspeed_config import frozen_deepspeed_config
from trainer.distributed import deepspeed

logger = logging.getLogger(__name__)


def shards(config: JobConfig) -> bool:
    """Whether `shard_frozen` partitions a frozen model under `config` (ZeRO-3)."""
    return config.parallel.zero_stage == 3


def shard_frozen(
    model: nn.Module, config: JobConfig, micro_batch_size: int, world_size: int, name: str
) -> nn.Module:
    """`model` frozen and in eval mode: itself below ZeRO-3, else an inference-only DeepSpeed
    engine around it whose parameters are partitioned over the `world_size` ranks (a
    collective: every rank calls it), logged as `name` ("dpo: reference"). Hash the weights
    before: afterwards each rank holds only its partition."""
    model.requires_grad_(False)
    if not shards(config):
        return model.eval()
    engine, *_ = deepspeed.initialize(
        model=model,
        config=frozen_deepspeed_config(config.parallel, micro_batch_size, world_size),
        dist_init_required=False,
    )
    frozen = cast(nn.Module, engine)
    frozen.eval()  # DeepSpeed's engine.eval() returns None, not the engine
    local, full = partition_numels(frozen)
    logger.info(
        "%s sharded over %d ranks (ZeRO-3): %d of its %d elements on this rank",
        name,
        world_size,
        local,
        full,
    )
    return frozen


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is a frozen model sharded by `shard_frozen`."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def release_frozen(model: nn.Module) -> None:
    """Unhook a sharded frozen model from DeepSpeed (its forward hooks) once it is no longer
    used, so that dropping the last reference to it frees its partitions."""
    destroy = getattr(model, "destroy", None)
    if is_sharded(model) and callable(destroy):
        destroy()


def partition_numels(model: nn.Module) -> tuple[int, int]:
    """(elements of this rank's partitions, elements of the whole model) of a sharded frozen
    model; (n, n) for a plain one."""
    local = full = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):
            local += int(param.ds_tensor.numel())
            full += int(getattr(param, "ds_numel"))  # noqa: B009 (a DeepSpeed attribute)
        else:
            local += param.numel()
            full += param.numel()
    return local, full
