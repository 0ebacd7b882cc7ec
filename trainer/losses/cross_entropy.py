"""Next-token cross-entropy, summed over target positions (labels != -100).

Objectives divide the sum by the global count of target tokens of the optimizer step, so the
one function serves training (sum / global count) and evaluation (sum, count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.batch import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(label) over positions whose label is not IGNORE_INDEX, in fp32.

    logits (..., V), labels (...) long.
    """
    return F.cross_entropy(
        logits.float().flatten(0, -2),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
