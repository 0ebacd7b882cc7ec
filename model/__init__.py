"""Decoder-only transformer models as plain single-device PyTorch (no ranks, no DeepSpeed)."""

from model.config import ModelConfig, ModelConfigError
from model.presets import PRESETS, preset_config
from model.transformer import Transformer, build_model

__all__ = [
    "PRESETS",
    "ModelConfig",
    "ModelConfigError",
    "Transformer",
    "build_model",
    "preset_config",
]
