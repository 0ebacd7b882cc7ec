"""Complete-or-invisible checkpoints.

Layout of one checkpoint (see INTERFACE.md):
    checkpoints/step_00000100/
        deepspeed/            the engine's model and optimizer states (DeepSpeed's own files)
        model.safetensors     consolidated weights (for export, generate, eval, init_from)
        trainer_state.json    step, tokens, data position, counters
        rng/rank_NNNNN.pt     Python, NumPy and torch RNG states of each rank
        config.yaml           the resolved job config
        tokenizer.model       the tokenizer (or tokenizer.json + tokenizer_config.json)
        manifest.json         SHA-256 and size of every file above

A save is written into `.tmp-step_N/`, fsynced, verified, then renamed into place; `latest` is
replaced atomically afterwards. A folder without a valid manifest is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or altered; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush one file or directory entry to disk (the one open/fsync/close of the project)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root`, then `root` itself."""
    for path in sorted(root.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)


def write_durably(path: Path, text: str) -> None:
    """Write a small text file and flush it, then its folder's entry."""
    path.write_text(text)
    fsync_path(path)
    fsync_path(path.parent)


def write_manifest(folder: Path, extra: dict[str, Any]) -> None:
    """Record the SHA-256 and size of every file in `folder`."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST:
            continue
        files[relative] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {**extra, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_path}: unreadable manifest") from None
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: size {path.stat().st_size} != {expected['bytes']} in manifest"
            )
        if sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 does not match the manifest")
    return dict(manifest)


def publish(tmp_folder: Path, checkpoint_root: Path, step: int, keep: int) -> Path:
    """Make a finished temporary folder visible: fsync, rename, update `latest`, prune."""
    final = checkpoint_root / step_dir_name(step)
    fsync_tree(tmp_folder)
    verify_checkpoint(tmp_folder)
    if final.exists():
        _remove_atomically(final)
    os.rename(tmp_folder, final)
    latest_tmp = checkpoint_root / f"{TMP_PREFIX}{LATEST}"
    write_durably(latest_tmp, final.name + "\n")
    os.replace(latest_tmp, checkpoint_root / LATEST)
    fsync_path(checkpoint_root)
    if keep > 0:
        for old in complete_checkpoints(checkpoint_root)[:-keep]:
            _remove_atomically(old)
    return final


def _remove_atomically(folder: Path) -> None:
    """Hide a checkpoint with one rename before deleting it: a kill mid-delete must not leave a
    folder that still has its manifest but lost files (leftovers are cleaned on the next start)."""
    doomed = folder.with_name(f"{TMP_PREFIX}deleting-{folder.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Published step folders (with a manifest), oldest first."""
    if not checkpoint_root.is_dir():
        return []
    folders = [
        p
        for p in checkpoint_root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / MANIFEST).is_file()
    ]
    return sorted(folders, key=lambda p: p.name)


def clean_temporaries(checkpoint_root: Path) -> None:
    """Remove leftovers of interrupted saves."""
    if checkpoint_root.is_dir():
        for path in checkpoint_root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def find_resume_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest checkpoint that verifies; older ones are tried when a newer one is damaged."""
    candidates = complete_checkpoints(checkpoint_root)
    latest_file = checkpoint_root / LATEST
    if latest_file.is_file():
        named = checkpoint_root / latest_file.read_text().strip()
        if named in candidates:  # `latest` first, then everything else newest first
            candidates.remove(named)
            candidates.append(named)
    problems = []
    for folder in reversed(candidates):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as exc:
            logger.warning("skipping damaged checkpoint: %s; falling back to an older one", exc)
            problems.append(str(exc))
    if problems:
        # Restarting from step 0 over damaged checkpoints would silently throw work away.
        raise CheckpointError(
            f"no checkpoint in {checkpoint_root} verifies (newest problem: {problems[0]}); "
            "repair or remove them, or set checkpoint.resume=none"
        )
    return None


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process uses, as tensors and plain values (loadable with weights_only)."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def safe_torch_load(path: Path) -> Any:
    """torch.load that never runs code from the file (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors surface as several exception types
        raise CheckpointError(
            f"{path}: refused to load ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
