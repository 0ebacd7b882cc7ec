"""Activation checkpointing policies give the same losses and gradients as none, with less kept."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, build_model
from model.transformer import Transformer
from trainer.parallelize import apply_activation_checkpointing, checkpointed_layers

DENSE = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
MOE = ModelConfig(
    vocab_size=128,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    max_seq_len=32,
    n_experts=4,
    top_k=2,
    moe_ffn_hidden_dim=48,
    aux_loss_coef=0.01,
)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run (here: during backward, where recomputation happens)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _step(model: Transformer) -> tuple[float, dict[str, torch.Tensor], int, int]:
    """One forward/backward; returns the loss, the gradients, and the matmul FLOPs and the
    number of ops that the backward ran (recomputation shows in both)."""
    tokens = torch.randint(0, 128, (2, 25), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss = loss + model.moe_aux_loss()
    flops, ops = FlopCounterMode(display=False), OpCounter()
    with flops, ops:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, flops.get_total_flops(), ops.ops


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_selective_ops_equals_no_checkpointing(config: ModelConfig) -> None:
    results = {}
    for mode in ("none", "selective_ops", "full"):
        model = build_model(config, seed=5)
        chosen = apply_activation_checkpointing(model, mode, every=2)
        assert chosen == ([] if mode == "none" else [0, 1])
        results[mode] = _step(model)
    loss, grads, flops_none, ops_none = results["none"]
    for mode in ("selective_ops", "full"):
        other_loss, other_grads, _, _ = results[mode]
        assert other_loss == loss, mode
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # The policy does what it says: backward recomputes no matmul (same FLOPs as without
    # checkpointing, where full recomputation adds the blocks' forward matmuls) but does
    # recompute the element-wise ops (more ops than without checkpointing).
    _, _, flops_selective, ops_selective = results["selective_ops"]
    _, _, flops_full, ops_full = results["full"]
    assert flops_selective == flops_none < flops_full, (flops_none, flops_selective, flops_full)
    assert ops_none < ops_selective < ops_full, (ops_none, ops_selective, ops_full)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="activation_checkpointing"):
        checkpointed_layers(4, "everything", 2)
    assert checkpointed_layers(4, "selective", 2) == [1, 3]
