"""`scaletrain export CK --format peft --out DIR`: a LoRA checkpoint as a peft adapter folder.

DIR gets adapter_model.safetensors + adapter_config.json (`model.hf.peft_adapter`) and DIR/base
the base model's HF export (adapters left out, tokenizer and chat template included), so

    base = AutoModelForCausalLM.from_pretrained("DIR/base")
    model = peft.PeftModel.from_pretrained(base, "DIR")

computes the checkpoint's network. The adapter config's `base_model_name_or_path` names DIR/base.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from model.hf import DEFAULT_MAX_SHARD_BYTES, family_for
from model.hf.peft_adapter import save_peft_adapter
from trainer.checkpointing import checkpoint as ckpt
from trainer.config import load_job_config
from trainer.hf_checkpoint import DTYPES, export_checkpoint
from trainer.inference import checkpoint_lora_config, has_adapters, resolve_checkpoint

BASE_FOLDER = "base"


def export_peft(
    checkpoint: str | Path,
    out: str | Path,
    architecture: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[Path, Path]:
    """Write a LoRA checkpoint's adapters to `out` and its base model to `out`/base; return
    (adapter folder, base folder). CheckpointError for a checkpoint without adapters."""
    folder = resolve_checkpoint(checkpoint)
    ckpt.verify_checkpoint(folder)
    state = load_file(folder / "model.safetensors")
    lora = checkpoint_lora_config(folder)
    if not has_adapters(state) or lora is None:
        raise ckpt.CheckpointError(
            f"{folder}: not a LoRA checkpoint (no adapters in model.safetensors, or no lora "
            "section in config.yaml); export it with --format hf"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ckpt.CheckpointError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    config = load_job_config(folder / "config.yaml", ignore_unknown_sections=True)
    family = family_for(config.model, architecture)
    out = Path(out)
    base = out / BASE_FOLDER
    # The adapters first: a model whose adapters peft cannot hold fails before any base is written.
    save_peft_adapter(
        state,
        config.model,
        lora,
        out,
        str(base.resolve()),
        family.architecture,
        DTYPES[dtype] if dtype is not None else None,
    )
    export_checkpoint(
        folder, base, family.architecture, dtype, max_shard_bytes, merge_adapters=False
    )
    return out, base
