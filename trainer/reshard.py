"""Resume a ZeRO checkpoint on another world size or ZeRO stage, optimizer state included.

A ZeRO-1/2/3 checkpoint stores each rank's slice of the flat fp32 master weights and Adam moments,
so only the same layout reads it back natively. When the layout changes, rank 0 converts the
DeepSpeed part once with DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`) into
its "universal" layout (one file per parameter and state, whole tensors), and every rank loads it
with `"checkpoint": {"load_universal": true}`: DeepSpeed cuts each rank's slice for the new layout.

The converted copy lives outside the published checkpoint, in
`RUN_DIR/reshard/<step folder>-<hash of its manifest>/`, written under a `.tmp-` name, given a
manifest (SHA-256 per file) and renamed into place only when complete; a cached copy is used
only while it verifies, otherwise it is rebuilt. Only the newest conversion is kept, and none
once a resume loads natively.

Conversion runs at resume, not at save: a change of world size is rare, the converted copy is as
large as the checkpoint, and same-layout resumes keep DeepSpeed's native (bit-exact) path.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint as ckpt

logger = logging.getLogger(__name__)

RESHARD_DIR = "reshard"
DEEPSPEED_TAG = "deepspeed"
# DeepSpeed's engine-state file at ZeRO-0/1/2 and (rank 0's) at ZeRO-3.
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


@dataclass(frozen=True)
class ResumeLayout:
    """How the checkpoint to resume from was written and how this run is laid out."""

    saved_world_size: int
    saved_zero_stage: int
    world_size: int
    zero_stage: int

    @property
    def native(self) -> bool:
        """DeepSpeed reads the checkpoint as it is: same layout, or ZeRO-0 (whole optimizer state
        in one file) on both sides."""
        same = (self.saved_world_size, self.saved_zero_stage) == (self.world_size, self.zero_stage)
        return same or (self.saved_zero_stage, self.zero_stage) == (0, 0)

    def describe(self) -> str:
        return (
            f"written by {self.saved_world_size} ranks at ZeRO-{self.saved_zero_stage}, "
            f"resuming on {self.world_size} ranks at ZeRO-{self.zero_stage}"
        )


def check_supported(folder: Path, layout: ResumeLayout) -> None:
    """Raise CheckpointError (one line) for the layout changes DeepSpeed cannot convert.

    ZeRO-0 keeps the torch optimizer's own state dict and a ZeRO-0 engine loads no universal
    checkpoint, so only ZeRO-1/2/3 <-> ZeRO-1/2/3 changes are converted.
    """
    if layout.native:
        return
    if 0 in (layout.saved_zero_stage, layout.zero_stage):
        raise ckpt.CheckpointError(
            f"{folder}: {layout.describe()}: the optimizer state converts only between ZeRO "
            "stages 1-3 (keep parallel.zero_stage and the world size of the checkpoint, or start "
            "a new run from its weights with model.init_from)"
        )


def cache_name(folder: Path) -> str:
    """`step_N-<first 16 hex of the manifest's SHA-256>`: the manifest hashes every file, so a
    changed checkpoint never matches an old conversion."""
    digest = hashlib.sha256((folder / ckpt.MANIFEST).read_bytes()).hexdigest()
    return f"{folder.name}-{digest[:16]}"


def universal_checkpoint(folder: Path, run_dir: Path) -> Path:
    """The verified universal copy of checkpoint `folder`, converting it if needed (rank 0 only).

    Returns a folder whose `deepspeed/` holds DeepSpeed's universal layout.
    """
    cache_root = run_dir / RESHARD_DIR
    target = cache_root / cache_name(folder)
    if target.is_dir():
        try:
            ckpt.verify_checkpoint(target)
            logger.info("using the converted checkpoint %s", target)
            _remove_others(cache_root, keep=target)
            return target
        except ckpt.CheckpointError as exc:
            logger.warning("converted checkpoint is damaged (%s); converting again", exc)
    _remove_others(cache_root, keep=None)
    tmp = cache_root / f"{ckpt.TMP_PREFIX}{target.name}"
    tmp.mkdir(parents=True)
    logger.info("converting %s to DeepSpeed's universal layout in %s", folder, target)
    convert_to_universal(folder / DEEPSPEED_TAG, tmp / DEEPSPEED_TAG)
    complete_for_any_stage(tmp / DEEPSPEED_TAG)
    ckpt.write_manifest(tmp, {"source": str(folder), "source_name": folder.name})
    ckpt._fsync_tree(tmp)  # durable before it becomes visible, as for saves
    os.rename(tmp, target)
    ckpt._fsync_tree_dir(cache_root)
    return target


def clear_cache(run_dir: Path) -> None:
    """Drop converted copies once a resume needs none (the run saves in its own layout again)."""
    shutil.rmtree(run_dir / RESHARD_DIR, ignore_errors=True)


def _remove_others(cache_root: Path, keep: Path | None) -> None:
    """Drop partial conversions and those of other checkpoints: one converted copy at most."""
    if not cache_root.is_dir():
        return
    for entry in cache_root.iterdir():
        if entry != keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def convert_to_universal(deepspeed_folder: Path, output_folder: Path) -> None:
    """DeepSpeed's ds_to_universal on one DeepSpeed checkpoint tag folder, in this process.

    `inject_missing_state` supplies the UNIVERSAL_CHECKPOINT_INFO that our engine does not write
    (it only carries tensor/pipeline-parallel merge patterns, and we use neither).
    """
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(deepspeed_folder),
        output_folder=str(output_folder),
        num_extract_workers=1,  # no worker processes inside a rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    report = io.StringIO()
    try:
        with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
            ds_to_universal.main(args)
    except Exception as exc:  # DeepSpeed raises asserts, RuntimeErrors, FileNotFoundErrors
        logger.debug("ds_to_universal output:\n%s", report.getvalue())
        raise ckpt.CheckpointError(
            f"{deepspeed_folder}: DeepSpeed's universal conversion failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    logger.debug("ds_to_universal output:\n%s", report.getvalue())


def complete_for_any_stage(universal_folder: Path) -> None:
    """Fill what DeepSpeed's converter leaves out when the ZeRO stage changes.

    A ZeRO-3 source gives no per-parameter `step.pt`, no `ds_version` and no
    `mp_rank_00_model_states.pt`, which a ZeRO-1/2 engine reads; a ZeRO-1/2 source gives no
    `optimizer_state_dict` (Adam's step and the parameter groups) and no ZeRO-3-named
    model-states file, which a ZeRO-3 engine reads. Each comes from what the other stage wrote.
    """
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM_GROUPS

    zero = universal_folder / "zero"
    optimizer_file = zero / "optimizer_state.pt"
    # DeepSpeed's own pickle (it may hold a loss-scaler object), written by us just now.
    optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=False)
    step_files = sorted(zero.glob("*/step.pt"))
    if step_files:
        step = torch.load(step_files[0], map_location="cpu", weights_only=True)
    else:
        step = optimizer_state[OPTIMIZER_STATE_DICT]["state"][0]["step"]
    for param_dir in (p for p in zero.iterdir() if p.is_dir()):
        if not (param_dir / "step.pt").is_file():
            torch.save(step, param_dir / "step.pt")
    if DS_VERSION not in optimizer_state:
        model_states = next(universal_folder.glob("*model_states.pt"))
        source = torch.load(model_states, map_location="cpu", weights_only=False)
        optimizer_state[DS_VERSION] = source["ds_version"]
    optimizer_state.setdefault(
        OPTIMIZER_STATE_DICT,
        {"state": {0: {"step": step}}, "param_groups": optimizer_state[PARAM_GROUPS]},
    )
    torch.save(optimizer_state, optimizer_file)
    # The engine-level state (scheduler, step counts) sits in a file named after the stage.
    stage12, stage3 = (universal_folder / name for name in MODEL_STATES_FILES)
    if not stage12.is_file():
        shutil.copyfile(stage3, stage12)
    if not stage3.is_file():
        shutil.copyfile(stage12, stage3)


def restore_param_groups(optimizer: Any, universal_folder: Path) -> None:
    """Give each parameter group its saved settings and its own step counter after a universal
    load.

    DeepSpeed's ZeRO-3 universal loader copies group 0's settings into every group, which would
    put weight decay on the norms and embeddings (group 1 has none), and gives every group the
    same `step` tensor, which torch's Adam increments in place once per group and step.
    """
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    optimizer_file = universal_folder / "zero" / "optimizer_state.pt"
    saved = torch.load(optimizer_file, map_location="cpu", weights_only=False)[PARAM_GROUPS]
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside ZeRO's
    groups = inner.param_groups
    if len(groups) != len(saved):
        raise ckpt.CheckpointError(
            f"{optimizer_file}: {len(saved)} parameter groups, the optimizer has {len(groups)}"
        )
    for group, saved_group in zip(groups, saved, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def restore_buffers(model: torch.nn.Module, weights: dict[str, Any]) -> int:
    """Copy persistent buffers (e.g. the MoE routers' expert bias) from consolidated weights.

    DeepSpeed's universal load restores parameters only; returns how many buffers were copied.
    """
    copied = 0
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in weights:
                buffer.copy_(weights[name].to(buffer.device, buffer.dtype))
                copied += 1
    return copied
