"""Config sections of the preference stages: `dpo.*` and `rm.*`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.losses.preference import DPO_LOSSES, REFERENCE_FREE_LOSSES


@dataclass
class DPOConfig:
    """`scaletrain dpo`: which loss of the DPO family and its coefficients.

    reference: the frozen reference model (a checkpoint, run dir or hf:DIR); None means the
    starting checkpoint (`model.init_from`). precompute_reference: compute the reference
    log-probs of the whole dataset once, before training, and cache them on disk
    (trainer/reference_cache.py), so the reference model is not held during training.
    """

    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0
    reference: str | None = None
    precompute_reference: bool = False

    def __post_init__(self) -> None:
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"loss: must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError(f"beta: must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss in ("ipo", "hinge"):
            raise ValueError(
                f"label_smoothing: the {self.loss!r} loss has no label smoothing "
                "(sigmoid, robust and simpo have)"
            )
        if self.simpo_gamma < 0:
            raise ValueError(f"simpo_gamma: must be >= 0, got {self.simpo_gamma}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight: must be >= 0, got {self.sft_weight}")
        if self.uses_reference is False and (self.reference or self.precompute_reference):
            key = "reference" if self.reference else "precompute_reference"
            raise ValueError(f"{key}: the {self.loss!r} loss is reference-free")

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs reference log-probs (all but SimPO)."""
        return self.loss not in REFERENCE_FREE_LOSSES


@dataclass
class RMConfig:
    """`scaletrain rm`: the Bradley-Terry reward-model loss.

    margin: subtract each pair's margin from the data (Llama 2's margin loss; records without
    one use 0). center_coef: weight of the reward-centering term mean((r_c + r_r)^2).
    """

    margin: bool = False
    center_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.center_coef < 0:
            raise ValueError(f"center_coef: must be >= 0, got {self.center_coef}")
