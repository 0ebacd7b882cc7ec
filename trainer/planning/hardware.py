"""Peak dense bf16 throughput by accelerator, for model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak per device, FLOP/s, from the vendors' datasheets (no sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
    "MI300X": 1307e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    upper = device_name.upper()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in upper:
            return value
    return None


def current_device_peak_flops() -> float | None:
    """Peak of this process's CUDA device; None on CPU (MFU is then reported as null)."""
    if not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name())
