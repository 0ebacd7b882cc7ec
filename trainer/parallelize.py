"""Parallelism applied to a plain model from outside, in a fixed order.

sequence parallel (the attention layers) -> expert parallel (the MoE layers) -> activation
checkpointing -> compile; the ZeRO / data-parallel wrap (`deepspeed.initialize`) comes last, in the Trainer.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from model.transformer import Transformer
from trainer.config import ParallelConfig
from trainer.expert_parallel import apply_expert_parallel
from trainer.sequence_parallel import apply_sequence_parallel

logger = logging.getLogger(__name__)


#: activation_checkpointing modes: none, full (every block), selective (every k-th block),
#: selective_ops (every block, keeping matmul and attention outputs, recomputing the rest).
CHECKPOINT_MODES = ("none", "full", "selective", "selective_ops")


def _aten_ops(*names: str) -> frozenset[Any]:
    """The default overloads of the named aten ops this torch build has (kernels vary by build)."""
    aten = torch.ops.aten
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


#: Kept by `selective_ops`: the outputs that cost FLOPs to recompute (matmuls, attention, the
#: MoE grouped GEMM). Everything else in a block (norms, RoPE, SiLU, products, residual adds,
#: views, routing) is element-wise or cheap, and is recomputed in backward instead of stored.
SAVED_OPS = _aten_ops(
    "mm",
    "addmm",
    "bmm",
    "_grouped_mm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def save_matmuls_policy(_ctx: Any, op: Any, *_args: Any, **_kwargs: Any) -> CheckpointPolicy:
    """Selective activation checkpointing: store matmul and attention outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_layers(n_layers: int, mode: str, every: int) -> list[int]:
    """Indices of the blocks whose activations are (at least partly) recomputed in backward."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(
            f"activation_checkpointing: expected one of {', '.join(CHECKPOINT_MODES)}, got {mode!r}"
        )
    if mode in ("full", "selective_ops"):
        return list(range(n_layers))
    if mode == "selective":
        return [i for i in range(n_layers) if i % every == every - 1]
    return []


def apply_activation_checkpointing(model: Transformer, mode: str, every: int) -> list[int]:
    """Recompute the chosen blocks' activations in backward; weights and state_dict unchanged."""
    chosen = checkpointed_layers(len(model.layers), mode, every)
    extra: dict[str, Any] = {}
    if mode == "selective_ops":
        extra["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, save_matmuls_policy
        )
    for index in chosen:
        block = model.layers[index]
        # Instance attribute over the class method: parameter names stay as they were.
        block.forward = functools.partial(
            checkpoint, block.__class__.forward.__get__(block), use_reentrant=False, **extra
        )
    return chosen


def apply_compile(model: Transformer, enabled: bool) -> bool:
    """torch.compile each block separately (small graphs, fast recompiles), MoE blocks included.

    On CPU too: inductor's CPU backend made a training step 1.69x faster than eager on a
    dim-256 model (docs/BENCHMARKS.md), after ~100 s of compilation, so it pays for runs longer
    than a few dozen steps.
    """
    if not enabled:
        return False
    for block in model.layers:
        block.compile()
    logger.info(
        "parallel.compile: %d blocks compiled with inductor on %s (the first step compiles)",
        len(model.layers),
        "CUDA" if torch.cuda.is_available() else "CPU",
    )
    return True


def parallelize(model: Transformer, config: ParallelConfig) -> Transformer:
    """Apply every strategy but the ZeRO wrap, in order."""
    attention_layers = apply_sequence_parallel(model, config.sequence_parallel)
    if attention_layers:
        logger.info(
            "sequence parallel: %d attention layers exchange heads for tokens all-to-all over "
            "groups of %d ranks (T/%d tokens per rank)",
            attention_layers,
            config.sequence_parallel,
            config.sequence_parallel,
        )
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
