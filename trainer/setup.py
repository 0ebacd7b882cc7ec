"""What a run builds before its first step: the batch split, the tokenizer, initial weights."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from data_pipeline.tokenizer import Tokenizer, train_tokenizer_on_sources
from model.transformer import Transformer
from trainer.checkpointing import checkpoint as ckpt
from trainer.config import JobConfig
from trainer.config_io import ConfigError, split_global_batch
from trainer.distributed import DistEnv, barrier

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_split(config: JobConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) that make up the global batch on `world_size` ranks.

    The ranks of a sequence-parallel group share their sequences (each holds a slice of every
    row), so the batch is split over world_size / parallel.sequence_parallel data ranks.
    """
    data_ranks = world_size // config.parallel.sequence_parallel
    # The same rule as `--dry-run` uses; a batch that does not split names the nearest that do.
    return split_global_batch(
        config.global_batch_seqs,
        config.data.seq_len,
        data_ranks,
        config.train.micro_batch_size,
        config.train.max_micro_batch_size,
    )


def prepare_tokenizer(config: JobConfig, run_dir: Path, env: DistEnv) -> Tokenizer:
    """The run's tokenizer: reuse the run's copy, load `tokenizer.path`, the prepared shards' or
    the `model.init_from` folder's (released weights need their own ids), or train one on rank 0."""
    target = run_dir / "tokenizer"
    init_dir = init_from_folder(config.model.init_from) if config.model.init_from else None
    if env.is_main and not Tokenizer.found_in(target):
        if config.tokenizer.path:
            tokenizer = Tokenizer.load(config.tokenizer.path)
        elif config.data.prepared:  # shards are tokenized already: use their tokenizer
            tokenizer = Tokenizer.load(config.data.prepared)
        elif init_dir is not None and Tokenizer.found_in(init_dir):
            tokenizer = Tokenizer.load(init_dir)
        else:
            logger.info("training a %d-piece tokenizer on data.train", config.tokenizer.vocab_size)
            tokenizer = train_tokenizer_on_sources(config.tokenizer, config.data)
        tokenizer.save(target)
    barrier()
    return Tokenizer.load(target)


def init_from_folder(source: str) -> Path | None:
    """The folder holding `model.init_from`'s files (tokenizer, chat template): hf:DIR's folder,
    a checkpoint folder, or a run dir's newest complete checkpoint; None for a weights file."""
    if source.startswith("hf:"):
        return Path(source.removeprefix("hf:"))
    path = Path(source)
    if path.is_file():
        return None
    from trainer.inference import resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"model.init_from: {exc}") from None


def load_weights(model: Transformer, source: str) -> None:
    """Copy weights into `model` from a scaletrain checkpoint folder or `hf:DIR` (`init_from`)."""
    from safetensors.torch import load_file

    if source.startswith("hf:"):
        from trainer.hf_checkpoint import load_hf_weights

        load_hf_weights(model, source)
        return

    from trainer.inference import read_checkpoint_weights, resolve_checkpoint

    path = Path(source)
    if path.is_file():
        state = load_file(path)
    else:
        try:
            state = read_checkpoint_weights(resolve_checkpoint(path))
        except ckpt.CheckpointError as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.init_from: {source}: weights do not fit the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
