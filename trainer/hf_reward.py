"""Reward-model checkpoints: load them, and export them as `...ForSequenceClassification`.

A reward checkpoint is an ordinary checkpoint folder whose model.safetensors holds a
RewardModel's state (the backbone under `backbone.` and the head `score.weight`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from data_pipeline.tokenizer import Tokenizer
from model import build_model
from model.hf.reward_export import SCORE_NAME, save_reward_model_as_hf
from model.reward import RewardModel
from trainer.checkpointing import checkpoint as ckpt
from trainer.config import JobConfig, load_job_config
from trainer.hf_checkpoint import DTYPES, write_tokenizer_files

logger = logging.getLogger(__name__)


@dataclass
class LoadedRewardModel:
    """A reward checkpoint ready to score: model (fp32, eval), tokenizer, config, folder."""

    model: RewardModel
    tokenizer: Tokenizer
    config: JobConfig
    folder: Path


def is_reward_checkpoint(folder: str | Path) -> bool:
    """Whether the checkpoint folder's weights carry a reward head."""
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt", device="cpu") as handle:
        return SCORE_NAME in handle.keys()  # noqa: SIM118 - safe_open is not a mapping


def load_reward_checkpoint(path: str | Path, device: str = "cpu") -> LoadedRewardModel:
    """Verify a reward checkpoint (folder or run dir) and build its RewardModel."""
    from trainer.inference import resolve_checkpoint

    folder = resolve_checkpoint(path)
    ckpt.verify_checkpoint(folder)
    if not is_reward_checkpoint(folder):
        raise ckpt.CheckpointError(f"{folder}: not a reward model (no {SCORE_NAME})")
    config = load_job_config(folder / "config.yaml", ignore_unknown_sections=True)
    model = RewardModel(build_model(config.model, "meta"))
    model.to_empty(device=device)
    model.load_state_dict(load_file(folder / "model.safetensors", device=device), strict=True)
    model.backbone.init_rope()
    return LoadedRewardModel(model.float().eval(), Tokenizer.load(folder), config, folder)


def export_reward_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    architecture: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a reward checkpoint as an HF sequence-classification folder with its tokenizer.

    transformers finds each row's score at the last token that is not `pad_token_id`, so the
    tokenizer's pad id is used (its EOS when it has none, with a warning: a sequence that ends
    in EOS is then scored one token early by transformers).
    """
    if dtype not in DTYPES:
        raise ckpt.CheckpointError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    loaded = load_reward_checkpoint(checkpoint)
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    if tokenizer.pad_id < 0:
        logger.warning("the tokenizer has no pad token; pad_token_id is the EOS id %d", pad_id)
    if pad_id < 0:
        raise ckpt.CheckpointError(f"{loaded.folder}: the tokenizer has neither pad nor EOS id")
    out = Path(out)
    name = save_reward_model_as_hf(loaded.model, out, pad_id, architecture, DTYPES[dtype])
    write_tokenizer_files(tokenizer, out, loaded.config.model.max_seq_len)
    logger.info("exported %s as %s to %s", loaded.folder, name, out)
    return out
