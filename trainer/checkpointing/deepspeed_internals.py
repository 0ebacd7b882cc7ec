"""Every DeepSpeed internal the project relies on, in one place.

DeepSpeed's public API does not cover what the loop needs here: its skipped-step counter,
stepping without clipping an empty ZeRO-0 gradient list, the ZeRO-3 consolidated state dict,
the checkpoint-engine seam for asynchronous saves, and switching universal loading for one
load. When a DeepSpeed upgrade breaks one of these, this module is the one to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

Engine = Any  # deepspeed.DeepSpeedEngine (untyped)


def skipped_steps(engine: Engine) -> int:
    """Optimizer steps DeepSpeed skipped so far (overflow or non-finite gradients)."""
    return int(engine.skipped_steps)


def engine_step(engine: Engine, skip: bool) -> None:
    """engine.step(); for a ZeRO-0 step whose gradients were dropped, without DeepSpeed's
    clipping (which cannot handle an empty gradient list). The scheduler still advances."""
    if not skip:
        engine.step()
        return
    clip = engine._config.gradient_clipping
    engine._config.gradient_clipping = 0.0
    try:
        engine.step()
    finally:
        engine._config.gradient_clipping = clip


def global_grad_norm(engine: Engine, fallback: float | None) -> float | None:
    """The gradient norm DeepSpeed measured at the last step, else `fallback`."""
    reported = engine.get_global_grad_norm()
    return float(reported) if reported is not None else fallback


def consolidated_state_dict(engine: Engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Whole weights by name: at ZeRO-3 a collective (every rank gathers, rank 0 receives)."""
    if zero_stage == 3:
        gathered = engine._zero3_consolidated_16bit_state_dict()
        return dict(gathered) if gathered is not None else {}
    return dict(engine.module.state_dict())


def load_checkpoint(engine: Engine, folder: Path, tag: str, universal: bool) -> bool:
    """Load model, optimizer and scheduler from `folder/tag`; `universal` switches DeepSpeed's
    universal-checkpoint loading on for this one load. False if DeepSpeed found nothing."""
    ds_config = engine._config
    configured, ds_config.load_universal_checkpoint = (
        ds_config.load_universal_checkpoint,
        universal,
    )
    try:
        load_path, _ = engine.load_checkpoint(
            str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        ds_config.load_universal_checkpoint = configured
    return load_path is not None


def install_snapshot_engine(engine: Engine) -> SnapshotCheckpointEngine:
    """Route the engine's checkpoint writes through a snapshotting engine (async saves)."""
    snapshot = SnapshotCheckpointEngine(engine._config)
    engine.checkpoint_engine = snapshot
    return snapshot


class SnapshotCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save engine whose `save` keeps a CPU copy instead of writing.

    Loads go straight through (resume and rollback read files synchronously).
    """

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self._pending: list[tuple[Any, str]] = []

    def save(self, state_dict: Any, path: str) -> None:
        self._pending.append((clone_tensors_for_torch_save(state_dict), path))

    def take_snapshot(self) -> list[tuple[Any, str]]:
        """The copies captured since the last call, to hand to the writer thread."""
        pending, self._pending = self._pending, []
        return pending

    def write(self, snapshot: list[tuple[Any, str]]) -> list[Path]:
        """Write captured state dicts with torch.save (from the writer thread)."""
        written = []
        for state_dict, path in snapshot:
            super().save(state_dict, path)
            written.append(Path(path))
        return written
