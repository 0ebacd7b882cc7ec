"""Parallelism applied to a plain model from outside, in a fixed order.

expert parallel (with the MoE layers) -> activation checkpointing -> compile; the ZeRO /
data-parallel wrap (`deepspeed.initialize`) comes last, in the Trainer.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

from model.transformer import Transformer
from trainer.config import ParallelConfig
from trainer.expert_parallel import apply_expert_parallel

logger = logging.getLogger(__name__)


def checkpointed_layers(n_layers: int, mode: str, every: int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    if mode == "full":
        return list(range(n_layers))
    if mode == "selective":
        return [i for i in range(n_layers) if i % every == every - 1]
    return []


def apply_activation_checkpointing(model: Transformer, mode: str, every: int) -> list[int]:
    """Recompute the chosen blocks' activations in backward; weights and state_dict unchanged."""
    chosen = checkpointed_layers(len(model.layers), mode, every)
    for index in chosen:
        block = model.layers[index]
        # Instance attribute over the class method: parameter names stay as they were.
        block.forward = functools.partial(
            checkpoint, block.__class__.forward.__get__(block), use_reentrant=False
        )
    return chosen


def apply_compile(model: Transformer, enabled: bool) -> bool:
    """torch.compile each block separately (small graphs, fast recompiles); CUDA only."""
    if not enabled:
        return False
    if not torch.cuda.is_available():
        logger.warning("parallel.compile is on but there is no CUDA device: running eagerly")
        return False
    for block in model.layers:
        block.compile()
    return True


def parallelize(model: Transformer, config: ParallelConfig) -> Transformer:
    """Apply every strategy but the ZeRO wrap, in order."""
    moe_layers = apply_expert_parallel(model, config.expert_parallel)
    if moe_layers:
        n_experts = model.config.n_experts
        logger.info(
            "expert parallel: %d MoE layers dispatch tokens all-to-all over groups of %d ranks "
            "(%d of %d experts computed per rank)",
            moe_layers,
            config.expert_parallel,
            n_experts // config.expert_parallel,
            n_experts,
        )
    apply_activation_checkpointing(model, config.activation_checkpointing, config.checkpoint_every)
    apply_compile(model, config.compile)
    return model
