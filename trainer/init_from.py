"""`model.init_from` alone defines the network: the shape comes from the source.

The source is a scaletrain checkpoint folder, a run dir (its newest complete checkpoint) or
`hf:DIR`. Keys written beside `init_from` in the `model` section (directly or through a
`preset`) must describe the same network; the first that differs stops the run with one line.
Training-only keys (loss coefficients, context length, ...) may be set and then apply.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from model.config import NETWORK_FIELDS, ModelConfig, ModelConfigError
from model.hf.families import HFFormatError
from model.hf.folder import HFFolder
from model.presets import preset_config
from trainer.config_io import ConfigError, from_dict, load_yaml

HF_PREFIX = "hf:"
CONFIG_YAML = "config.yaml"
# Keys that do not change the weights' meaning: taken from the section when written there.
_TRAINING_KEYS = (
    "max_seq_len",
    "init_std",
    "aux_loss_coef",
    "z_loss_coef",
    "aux_free_bias_update_rate",
    "capacity_factor",
    "reset_positions_per_document",
    "extra",
)


def source_model_config(init_from: str) -> ModelConfig:
    """The ModelConfig stored with `init_from` (hf:DIR's config.json, or the checkpoint's
    config.yaml `model` section; its other sections are not read, whatever they are)."""
    if init_from.startswith(HF_PREFIX):
        hf_dir = init_from.removeprefix(HF_PREFIX)
        try:
            return HFFolder(hf_dir).model_config()
        except HFFormatError as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
    from trainer.checkpointing.checkpoint import CheckpointError
    from trainer.inference import resolve_checkpoint

    try:
        folder = resolve_checkpoint(Path(init_from))
    except CheckpointError as exc:
        raise ConfigError(f"model.init_from: {exc}") from None
    path = folder / CONFIG_YAML
    raw = load_yaml(path)
    section = raw.get("model")
    if not isinstance(section, dict):
        raise ConfigError(f"model.init_from: {path} has no model section")
    return _model_config(section, f"{path}: model")


def _model_config(section: dict[str, Any], where: str) -> ModelConfig:
    fields = dict(section)
    if fields.get("preset"):
        try:
            fields = {**preset_config(str(fields["preset"])), **fields}
        except ModelConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    return from_dict(ModelConfig, fields, where)


def resolve_init_from_model(model_section: dict[str, Any], init_from: str) -> ModelConfig:
    """The ModelConfig of a run whose `model` section (as written, before preset expansion)
    sets `init_from`: the source's shape, with the section's training-only keys applied.

    ConfigError naming the first key of the section that describes another network.
    """
    source = source_model_config(init_from)
    written = {k: v for k, v in model_section.items() if k not in ("init_from", "preset")}
    source_fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(ModelConfig)}
    stated = dict(written)
    if model_section.get("preset"):
        # A preset written beside init_from is a statement about the shape too.
        try:
            stated = {**preset_config(str(model_section["preset"])), **written}
        except ModelConfigError as exc:
            raise ConfigError(f"model.{exc}") from None
        stated.pop("preset")
    # The section's keys over the source's, so derived fields resolve as the section implies.
    candidate = from_dict(ModelConfig, {**source_fields, **stated}, "model")
    for derived, key in NETWORK_FIELDS:
        ours, theirs = getattr(candidate, derived), getattr(source, derived)
        if ours != theirs:
            raise ConfigError(
                f"model.{key}: {ours!r} does not match {theirs!r} from the source "
                f"(model.init_from: {init_from}); remove the key or make it agree"
            )
    training = {key: written[key] for key in _TRAINING_KEYS if key in written}
    resolved = from_dict(ModelConfig, {**source_fields, **training}, "model")
    resolved.init_from = init_from
    return resolved
