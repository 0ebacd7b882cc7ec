"""Checks that catch, before any setup or run-directory write, what `train` would fail on later.

`preflight(config)` runs at the start of `train` and in `--dry-run`: data sources that match no
file, a tokenizer or `model.init_from` that is not there, a `run.dir` that cannot be written.
Each problem is one ConfigError line naming the key. Nothing here imports DeepSpeed, and
nothing is created on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config_io import ConfigError

if TYPE_CHECKING:
    from data_pipeline.config import SourceConfig
    from trainer.config import JobConfig


def load_config(path: str, overrides: list[str], stage: str = "pretrain") -> JobConfig:
    """`load_job_config` for `stage` (its sections registered first), with an error caused by
    a `--set` override naming that `--set` rather than the config file."""
    from trainer.config import load_job_config

    if stage != "pretrain":
        from trainer.stages import get_stage

        get_stage(stage)  # imports the stage's module, which registers its config sections
    try:
        return load_job_config(path, overrides, stage=stage)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{path}: ")
        error_key, _, problem = message.partition(": ")
        for assignment in reversed(overrides):  # the last --set of a key is the one that counts
            set_key = assignment.partition("=")[0].strip()
            if error_key == set_key:
                raise ConfigError(f"--set {assignment}: {problem}") from None
            if error_key.startswith(set_key + ".") or set_key.startswith(error_key + "."):
                raise ConfigError(f"--set {assignment}: {message}") from None
        raise


def preflight(config: JobConfig) -> None:
    """Raise a one-line ConfigError for the first input of `config` that a run would fail on."""
    if config.data.prepared:
        prepared = Path(config.data.prepared)
        if not (prepared / "metadata.json").is_file():
            raise ConfigError(
                f"data.prepared: {prepared}: no prepared shards there (no metadata.json); "
                "write them with `scaletrain data prepare CONFIG`"
            )
    else:
        check_sources(config.data.train, "data.train")
        check_sources(config.data.validation, "data.validation")
    if config.tokenizer.path:
        check_tokenizer(config.tokenizer.path)
    if config.model.init_from:
        check_init_from(config.model.init_from)
    check_writable_dir(config.run.dir, "run.dir")
    planned = config.parallel.planned_world_size
    if planned is not None and planned < 1:
        raise ConfigError(f"parallel.planned_world_size: must be >= 1, got {planned}")


def check_sources(sources: list[SourceConfig], key: str) -> None:
    """Every local path, glob or folder matches data files; `hf:` and `builtin:` pass as given
    (a hub dataset is only reachable at run time; the builtin corpus is checked when read)."""
    from data_pipeline.errors import DataError
    from data_pipeline.sources import resolve_local_files

    for index, source in enumerate(sources):
        if source.path.startswith(("hf:", "builtin:")):
            continue
        try:
            resolve_local_files(source.path)  # the same resolution the data loader uses
        except DataError as exc:
            raise ConfigError(f"{key}.{index}.path: {exc}") from None


def check_tokenizer(path: str) -> None:
    """`tokenizer.path` is a tokenizer file, or a folder holding one."""
    from data_pipeline.tokenizer import Tokenizer

    where = Path(path)
    if where.is_dir():
        if not Tokenizer.found_in(where):
            raise ConfigError(
                f"tokenizer.path: {path}: folder has no tokenizer.model or tokenizer.json"
            )
    elif not where.is_file():
        raise ConfigError(f"tokenizer.path: {path}: no such file or folder")


def check_init_from(source: str) -> None:
    """`model.init_from`: `hf:DIR` with a config.json, a checkpoint folder, or a run dir (or
    its checkpoints/ folder) holding a complete checkpoint."""
    from trainer.checkpointing import checkpoint as ckpt

    if source.startswith("hf:"):
        folder = Path(source.removeprefix("hf:"))
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.init_from: {source}: no config.json in {folder} "
                "(expected a local Hugging Face model folder)"
            )
        return
    path = Path(source)
    if (path / "model.safetensors").is_file() or (path / ckpt.MANIFEST).is_file():
        return  # a checkpoint folder
    for root in (path / "checkpoints", path):
        if ckpt.complete_checkpoints(root):
            return
    if not path.exists():
        raise ConfigError(f"model.init_from: {source}: no such folder")
    raise ConfigError(
        f"model.init_from: {source}: no checkpoint there (looked for {path}/model.safetensors "
        f"and complete step_* folders in {path}/checkpoints and {path})"
    )


def check_writable_dir(path: str, key: str) -> None:
    """`path` is a folder this process can write, or can be created (without creating it)."""
    where = Path(path).absolute()
    existing = where
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = (
            "is not writable"
            if existing == where
            else f"cannot be created ({existing} is not writable)"
        )
        raise ConfigError(f"{key}: {path}: {what}")
