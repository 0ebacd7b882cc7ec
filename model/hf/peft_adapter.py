"""LoRA adapters as a `peft` adapter folder: adapter_model.safetensors + adapter_config.json.

`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)` loads the
folder on top of the base model's HF export (`scaletrain export --format hf` of the same
checkpoint with the adapters left out). Names come from the one ours<->HF mapping in
`model.hf.state_dict`: `layers.3.attention.q_proj.lora_A` becomes
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.

Stacked expert adapters (`experts.gate_proj_lora_A`, one pair per expert) are refused: released
MoE models keep experts as per-expert modules on disk, but `transformers` 5 fuses them in memory
into 3-D parameters (Qwen3-MoE: `mlp.experts.gate_up_proj` (E, 2*hidden, dim) and `down_proj`),
which peft's `target_modules` cannot address. peft reaches them only through `target_parameters`,
where our separate gate and up adapters would have to become one block-diagonal pair of rank 2r
on the fused tensor; that is not written. Such a model exports with the adapters merged
(`merged_state_dict`, then the HF export); adapters on its attention export as usual.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.hf.families import HFFormatError, family_for
from model.hf.state_dict import ours_to_hf_name
from model.lora import LORA_A, LORA_B, LoRAConfig, adapter_pairs

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the *ForCausalLM


def peft_adapter_tensors(
    state_dict: dict[str, torch.Tensor],
    model_config: ModelConfig,
    architecture: str | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(peft tensor name -> tensor, sorted target module names) for the adapters of a full
    state dict (ours, consolidated). HFFormatError for adapters peft cannot hold."""
    family = family_for(model_config, architecture)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for base_name, names in sorted(adapter_pairs(state_dict).items()):
        if not base_name.endswith(".weight"):  # stacked experts: `...experts.gate_proj`
            raise HFFormatError(
                f"lora.targets: experts adapters ({base_name}) cannot be exported for peft "
                "(transformers fuses experts in memory); export merged weights with --format hf"
            )
        module = ours_to_hf_name(base_name, family.moe_style).removesuffix(".weight")
        targets.add(module.rsplit(".", 1)[-1])
        for kind, name in zip((LORA_A, LORA_B), names, strict=True):
            tensors[f"{PEFT_PREFIX}{module}.{kind}.weight"] = state_dict[name].contiguous()
    if not tensors:
        raise HFFormatError("lora: this checkpoint has no LoRA adapters to export for peft")
    return tensors, sorted(targets)


def peft_adapter_config(
    lora_config: LoRAConfig, targets: list[str], base_model_name_or_path: str
) -> dict[str, Any]:
    """adapter_config.json: a plain LoRA (no rsLoRA, DoRA or biases) on a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft_adapter(
    state_dict: dict[str, torch.Tensor],
    model_config: ModelConfig,
    lora_config: LoRAConfig,
    out: str | Path,
    base_model_name_or_path: str,
    architecture: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the adapters of a full state dict as a peft folder `out`; return it.

    `architecture` must be the one the base model is exported as (its module names);
    `dtype` None keeps the adapters' own.
    """
    if not lora_config.enabled:
        raise HFFormatError("lora.rank: 0 (full fine-tuning) has no adapters; use --format hf")
    tensors, targets = peft_adapter_tensors(state_dict, model_config, architecture)
    if dtype is not None:
        tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / ADAPTER_WEIGHTS, {"format": "pt"})
    config = peft_adapter_config(lora_config, targets, base_model_name_or_path)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
