"""Resume a checkpoint on another world size or ZeRO stage, optimizer state included.

A ZeRO-1/2/3 checkpoint stores each rank's slice of the flat fp32 master weights and Adam moments,
so only the same layout reads it back natively. When the layout changes, rank 0 converts the
DeepSpeed part once with DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`) into
its "universal" layout (one file per parameter and state, whole tensors), and every rank loads it
with `"checkpoint": {"load_universal": true}`: DeepSpeed cuts each rank's slice for the new layout.
An fp32 ZeRO-0 checkpoint (whole weights and torch optimizer state) is written into the same
layout directly; a ZeRO-0 run, which loads no universal checkpoint, gets a plain ZeRO-0 checkpoint
rebuilt from the universal layout.

The converted copy lives outside the published checkpoint, in
`RUN_DIR/reshard/<step folder>-<hash of its manifest>-<target>/`, written under a `.tmp-` name,
given a manifest (SHA-256 per file) and renamed into place only when complete; a cached copy is
used only while it verifies, otherwise it is rebuilt. Only the newest conversion is kept, and
none once a resume loads natively.

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

from trainer.checkpointing import checkpoint as ckpt

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
    saved_precision: str
    world_size: int
    zero_stage: int
    precision: str

    @property
    def native(self) -> bool:
        """DeepSpeed reads the checkpoint as it is: same layout, or ZeRO-0 (whole optimizer state
        in one file) on both sides."""
        same = (self.saved_world_size, self.saved_zero_stage) == (self.world_size, self.zero_stage)
        return same or (self.saved_zero_stage, self.zero_stage) == (0, 0)

    @property
    def target(self) -> str:
        """What the conversion produces: DeepSpeed's universal layout for a ZeRO-1/2/3 engine,
        or a plain ZeRO-0 checkpoint (a ZeRO-0 engine loads no universal checkpoint)."""
        return "universal" if self.zero_stage else "zero0"

    def describe(self) -> str:
        return (
            f"written by {self.saved_world_size} ranks at ZeRO-{self.saved_zero_stage}, "
            f"resuming on {self.world_size} ranks at ZeRO-{self.zero_stage}"
        )


@dataclass(frozen=True)
class ModelLayout:
    """What a conversion from or to ZeRO-0 needs of the model: parameter names in the order of
    the optimizer's groups (the torch optimizer's state is indexed by position), and shapes."""

    names_by_group: list[list[str]]
    shapes: dict[str, tuple[int, ...]]


def check_supported(folder: Path, layout: ResumeLayout) -> None:
    """Raise CheckpointError (one line) for the layout changes that are not converted.

    At ZeRO-0 only fp32 keeps the torch optimizer's plain state (bf16/fp16 wrap it in
    DeepSpeed's own mixed-precision optimizer), so conversions from or to ZeRO-0 need fp32.
    """
    if layout.native or 0 not in (layout.saved_zero_stage, layout.zero_stage):
        return
    precision = layout.saved_precision if layout.saved_zero_stage == 0 else layout.precision
    if precision != "fp32":
        raise ckpt.CheckpointError(
            f"{folder}: {layout.describe()}: the optimizer state converts from or to ZeRO-0 only "
            f"in fp32, not {precision} (keep parallel.zero_stage of the checkpoint, or start a "
            "new run from its weights with model.init_from)"
        )


def cache_name(folder: Path, layout: ResumeLayout) -> str:
    """`step_N-<first 16 hex of the manifest's SHA-256>-<target>`: the manifest hashes every
    file, so a changed checkpoint never matches an old conversion."""
    digest = hashlib.sha256((folder / ckpt.MANIFEST).read_bytes()).hexdigest()
    return f"{folder.name}-{digest[:16]}-{layout.target}"


def converted_checkpoint(
    folder: Path, run_dir: Path, layout: ResumeLayout, model: ModelLayout
) -> Path:
    """The verified converted copy of checkpoint `folder`, converting it if needed (rank 0).

    Returns a folder whose `deepspeed/` this run's engine loads: the universal layout, or a
    ZeRO-0 checkpoint when this run is at ZeRO-0.
    """
    cache_root = run_dir / RESHARD_DIR
    target = cache_root / cache_name(folder, layout)
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
    logger.info("converting %s for %s in %s", folder, layout.describe(), target)
    try:
        _convert(folder, tmp, layout, model)
    except ckpt.CheckpointError:
        raise
    except Exception as exc:  # every rank must hear of it, as one line (details in the log)
        logger.debug("conversion of %s failed", folder, exc_info=True)
        raise ckpt.CheckpointError(
            f"{folder}: converting it for {layout.describe()} failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    ckpt.write_manifest(tmp, {"source": str(folder), "source_name": folder.name})
    ckpt.fsync_tree(tmp)  # durable before it becomes visible, as for saves
    os.rename(tmp, target)
    ckpt.fsync_path(cache_root)
    return target


def _convert(folder: Path, tmp: Path, layout: ResumeLayout, model: ModelLayout) -> None:
    """Write the converted `deepspeed/` of checkpoint `folder` into `tmp`."""
    source = folder / DEEPSPEED_TAG
    universal = tmp / DEEPSPEED_TAG if layout.zero_stage else tmp / "universal"
    if layout.saved_zero_stage == 0:
        zero0_to_universal(source, universal, model)
    else:
        convert_to_universal(source, universal)
    complete_for_any_stage(universal)
    if layout.zero_stage == 0:
        from safetensors.torch import load_file

        weights = load_file(folder / "model.safetensors")
        universal_to_zero0(universal, tmp / DEEPSPEED_TAG, model, weights)
        shutil.rmtree(universal)


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


def zero0_to_universal(deepspeed_folder: Path, output_folder: Path, model: ModelLayout) -> None:
    """Write the universal layout from an fp32 ZeRO-0 checkpoint, whose model-states file holds
    the whole weights and the torch optimizer's state dict (indexed by position in the groups)."""
    from deepspeed.checkpoint.constants import (
        CAT_DIM,
        DS_VERSION,
        OPTIMIZER_STATE_DICT,
        PARAM,
        PARAM_GROUPS,
    )

    source_file = deepspeed_folder / MODEL_STATES_FILES[0]
    source = torch.load(source_file, map_location="cpu", weights_only=False)  # verified
    module, optimizer = source["module"], source["optimizer"]
    groups = optimizer["param_groups"]
    if [len(g["params"]) for g in groups] != [len(names) for names in model.names_by_group]:
        raise ckpt.CheckpointError(
            f"{source_file}: its optimizer groups do not match this model's parameters"
        )
    zero = output_folder / "zero"
    step = None
    for group, names in zip(groups, model.names_by_group, strict=True):
        for index, name in zip(group["params"], names, strict=True):
            state = optimizer["state"].get(index)
            if state is None or name not in module:
                raise ckpt.CheckpointError(f"{source_file}: no optimizer state for {name}")
            param_dir = zero / name
            param_dir.mkdir(parents=True)
            tensors = {
                "fp32": module[name],
                "exp_avg": state["exp_avg"],
                "exp_avg_sq": state["exp_avg_sq"],
            }
            for key, tensor in tensors.items():
                torch.save({PARAM: tensor.detach().float(), CAT_DIM: 0}, param_dir / f"{key}.pt")
            torch.save(state["step"], param_dir / "step.pt")
            step = state["step"]
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    torch.save(
        {
            DS_VERSION: source[DS_VERSION],
            PARAM_GROUPS: settings,
            OPTIMIZER_STATE_DICT: {"state": {0: {"step": step}}, PARAM_GROUPS: settings},
        },
        zero / "optimizer_state.pt",
    )
    shutil.copyfile(source_file, output_folder / MODEL_STATES_FILES[0])


def universal_to_zero0(
    universal_folder: Path, output_folder: Path, model: ModelLayout, weights: dict[str, Any]
) -> None:
    """Write an fp32 ZeRO-0 checkpoint (DeepSpeed's own format) from the universal layout:
    the fp32 master weights as the module (buffers and tied aliases from the consolidated
    `weights`) and a torch optimizer state dict in this model's group order."""
    from deepspeed.checkpoint.constants import PARAM, PARAM_GROUPS

    zero = universal_folder / "zero"

    def tensor(name: str, key: str) -> torch.Tensor:
        loaded = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)
        value = loaded[PARAM] if isinstance(loaded, dict) else loaded
        return value.float().reshape(model.shapes[name]).contiguous()

    settings = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)[
        PARAM_GROUPS
    ]
    module = dict(weights)
    state: dict[int, dict[str, Any]] = {}
    groups = []
    for group_settings, names in zip(settings, model.names_by_group, strict=True):
        indices = []
        for name in names:
            module[name] = tensor(name, "fp32")
            step = torch.load(zero / name / "step.pt", map_location="cpu", weights_only=False)
            state[len(state)] = {
                "step": step,
                "exp_avg": tensor(name, "exp_avg"),
                "exp_avg_sq": tensor(name, "exp_avg_sq"),
            }
            indices.append(len(state) - 1)
        groups.append({**group_settings, "params": indices})
    engine_state = torch.load(
        universal_folder / MODEL_STATES_FILES[0], map_location="cpu", weights_only=False
    )
    engine_state["module"] = module
    engine_state["optimizer"] = {"state": state, "param_groups": groups}
    output_folder.mkdir(parents=True)
    torch.save(engine_state, output_folder / MODEL_STATES_FILES[0])


def complete_for_any_stage(universal_folder: Path) -> None:
    """Fill what DeepSpeed's converter leaves out when the ZeRO stage changes.

    A ZeRO-3 source gives bare tensors where a ZeRO-1/2 engine reads `{"param": ...}`, and no
    per-parameter `step.pt`, no `ds_version` and no
    `mp_rank_00_model_states.pt`, which a ZeRO-1/2 engine reads; a ZeRO-1/2 source gives no
    `optimizer_state_dict` (Adam's step and the parameter groups) and no ZeRO-3-named
    model-states file, which a ZeRO-3 engine reads. Each comes from what the other stage wrote.
    """
    from deepspeed.checkpoint.constants import (
        CAT_DIM,
        DS_VERSION,
        OPTIMIZER_STATE_DICT,
        PARAM,
        PARAM_GROUPS,
    )

    zero = universal_folder / "zero"
    optimizer_file = zero / "optimizer_state.pt"
    # DeepSpeed's own pickle (it may hold a loss-scaler object), written by us just now.
    optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=False)
    step_files = sorted(zero.glob("*/step.pt"))
    if step_files:
        step = torch.load(step_files[0], map_location="cpu", weights_only=False)
    else:
        step = optimizer_state[OPTIMIZER_STATE_DICT]["state"][0]["step"]
    # Parameters have Adam moments; the converter also writes buffers' values (fp32.pt only).
    for param_dir in (p.parent for p in zero.glob("*/exp_avg.pt")):
        if not (param_dir / "step.pt").is_file():
            torch.save(step, param_dir / "step.pt")
        for key in ("fp32", "exp_avg", "exp_avg_sq"):  # ZeRO-3's are bare (flat) tensors
            state_file = param_dir / f"{key}.pt"
            value = torch.load(state_file, map_location="cpu", weights_only=True)
            if torch.is_tensor(value):
                torch.save({PARAM: value, CAT_DIM: 0}, state_file)
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
