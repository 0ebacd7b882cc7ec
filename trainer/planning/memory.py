"""Per-rank memory of model states (parameters, gradients, optimizer) by ZeRO stage.

Adam in mixed precision keeps 16 bytes per parameter (ZeRO paper, Rajbhandari et al. 2020):
2 (bf16/fp16 weights) + 2 (grads) + 12 (fp32 master weights, momentum, variance). In fp32 it is
4 + 4 + 8 = 16 at ZeRO-0; DeepSpeed's ZeRO optimizers step a separate fp32 partition, so from
stage 1 the optimizer part is 12 bytes (before sharding), as in mixed precision. ZeRO-1 shards the optimizer states over the data-parallel ranks, ZeRO-2
also the gradients, ZeRO-3 also the parameters; CPU offload moves optimizer states (and at
stage 3 parameters) to host memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelStateMemory:
    """Bytes per rank on the accelerator, plus what offload puts in host memory."""

    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    host_bytes: float

    @property
    def device_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def model_state_memory(
    n_params: int, zero_stage: int, world_size: int, precision: str, offload: str = "none"
) -> ModelStateMemory:
    """Model-state bytes per rank for `n_params` parameters under the given sharding."""
    if precision in ("bf16", "fp16"):
        param_b, grad_b, optim_b = 2.0, 2.0, 12.0
    else:
        # fp32: ZeRO-0 steps the parameters in place (Adam moments only); ZeRO-1/2/3 keep a
        # separate fp32 partition to step, as in mixed precision.
        param_b, grad_b, optim_b = 4.0, 4.0, 12.0 if zero_stage >= 1 else 8.0
    params = n_params * param_b / (world_size if zero_stage >= 3 else 1)
    grads = n_params * grad_b / (world_size if zero_stage >= 2 else 1)
    optimizer = n_params * optim_b / (world_size if zero_stage >= 1 else 1)
    host = 0.0
    if offload == "cpu":
        host += optimizer
        optimizer = 0.0
        if zero_stage == 3:
            host += params
            params = 0.0
    return ModelStateMemory(params, grads, optimizer, host)
