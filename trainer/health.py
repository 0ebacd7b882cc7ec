"""Numerical health: skip updates whose loss is not finite or spikes far above recent losses.

A micro-batch found bad before its backward gets a NaN-poisoned backward. DeepSpeed's ZeRO
optimizers (every precision) then skip the whole step as an overflow; at ZeRO-0 the Trainer
drops the gradients itself. Poisoned gradients are all-reduced, so every rank skips together.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class TrainingHealthError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); one line for the user."""


class LossGuard:
    """Decides which losses are bad and counts skipped steps; its state goes into checkpoints.

    A loss is a spike when it exceeds mean + sigma * std of the last `window` accepted step
    losses, once `min_history` of them exist (PaLM-style spike skipping).
    """

    def __init__(
        self, sigma: float, window: int, min_history: int, max_nonfinite_in_a_row: int
    ) -> None:
        self.sigma = sigma
        self.window: deque[float] = deque(maxlen=window)
        self.min_history = min_history
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.skipped_nonfinite = 0
        self.skipped_spikes = 0
        self.nonfinite_in_a_row = 0

    def classify(self, loss: float) -> str | None:
        """'nonfinite', 'spike' or None for one micro-batch loss."""
        if not math.isfinite(loss):
            return "nonfinite"
        if self.sigma > 0 and len(self.window) >= self.min_history:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            if loss > mean + self.sigma * max(std, 1e-3 * abs(mean)):
                return "spike"
        return None

    def after_step(self, loss: float, skipped: bool, reason: str | None) -> None:
        """Record the outcome of a step (the same on every rank: `loss` is the global mean)."""
        if not skipped:
            self.window.append(loss)
            self.nonfinite_in_a_row = 0
            return
        if reason == "spike":
            self.skipped_spikes += 1
            self.nonfinite_in_a_row = 0
            return
        self.skipped_nonfinite += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            raise TrainingHealthError(
                f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient; stopping "
                "(lower train.lr, check the data, or resume from an earlier checkpoint)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": list(self.window),
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_spikes": self.skipped_spikes,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.clear()
        self.window.extend(float(x) for x in state["window"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.skipped_spikes = int(state["skipped_spikes"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
