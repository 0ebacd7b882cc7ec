"""Loading a checkpoint's consolidated weights for generation, evaluation and export."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from data_pipeline.batch import causal_lm_batch
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.packing import validation_sequences
from data_pipeline.tokenizer import Tokenizer
from model import build_model
from model.lora import LoRAConfig, is_adapter_name, merged_state_dict
from model.transformer import Transformer
from trainer.checkpointing import checkpoint as ckpt
from trainer.config import JobConfig, load_job_config
from trainer.config_io import from_dict, load_yaml
from trainer.objectives.causal_lm import CausalLMObjective


@dataclass
class LoadedCheckpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: JobConfig
    folder: Path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run dir / checkpoints dir (then its newest complete one)."""
    path = Path(path)
    if (path / ckpt.MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = ckpt.find_resume_checkpoint(root)
        if found is not None:
            return found
    raise ckpt.CheckpointError(
        f"{path}: no complete checkpoint found (looked for {path}/{ckpt.MANIFEST}, and for "
        f"step_* folders with one in {path / 'checkpoints'} and {path})"
    )


def checkpoint_lora_config(folder: Path) -> LoRAConfig | None:
    """The `lora` section of a checkpoint's config.yaml when its run trained adapters."""
    section = load_yaml(folder / "config.yaml").get("lora")
    if not isinstance(section, dict):
        return None
    lora = from_dict(LoRAConfig, section, "lora")
    return lora if lora.rank > 0 else None


def has_adapters(names: Iterable[str]) -> bool:
    """Whether a state dict's names include LoRA adapter tensors."""
    return any(is_adapter_name(name) for name in names)


def read_checkpoint_weights(folder: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's model.safetensors as a plain model state dict: LoRA adapters (if its run
    trained them) folded into their base weights, so every reader sees one network."""
    state = load_file(folder / "model.safetensors", device=device)
    if not has_adapters(state):
        return state
    lora = checkpoint_lora_config(folder)
    if lora is None:
        raise ckpt.CheckpointError(
            f"{folder}: model.safetensors holds LoRA adapters but config.yaml has no lora section"
        )
    return merged_state_dict(state, lora)


def load_checkpoint_model(path: str | Path, device: str = "cpu") -> LoadedCheckpoint:
    """Verify a checkpoint and build its model from model.safetensors (any ZeRO stage or world
    size; LoRA adapters folded in)."""
    folder = resolve_checkpoint(path)
    ckpt.verify_checkpoint(folder)
    config = load_job_config(folder / "config.yaml", ignore_unknown_sections=True)
    model = build_model(config.model, "meta")
    model.to_empty(device=device)
    model.load_state_dict(read_checkpoint_weights(folder, device), strict=True)
    model.init_rope()
    model.float().eval()
    return LoadedCheckpoint(model, Tokenizer.load(folder), config, folder)


@torch.no_grad()
def evaluate_source(
    loaded: LoadedCheckpoint, source: str, split: str, max_sequences: int, batch_size: int = 8
) -> tuple[float, int]:
    """Mean loss per token of `loaded.model` on up to `max_sequences` packed sequences of `source`."""
    data_config = DataConfig(
        seq_len=loaded.config.data.seq_len,
        builtin_validation_percent=loaded.config.data.builtin_validation_percent,
    )
    sequences = validation_sequences(
        SourceConfig(path=source), loaded.tokenizer, data_config, max_sequences, split
    )
    if not sequences:
        raise ckpt.CheckpointError(
            f"{source}: no sequence of {data_config.seq_len} tokens to evaluate"
        )
    objective = CausalLMObjective(data_config.seq_len)
    loss_sum, tokens = 0.0, 0.0
    for chunk in torch.stack(sequences).split(batch_size):
        chunk_sum, chunk_tokens = objective.eval_step(loaded.model, causal_lm_batch(chunk))[
            "eval_loss"
        ]
        loss_sum += chunk_sum
        tokens += chunk_tokens
    return loss_sum / tokens, int(tokens)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
