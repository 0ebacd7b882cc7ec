"""Numerical health: skip updates whose loss is not finite or spikes far above recent losses.

The loop classifies the *global step loss* (the statistic the window holds), once per step,
after the last micro-batch's forward and before its backward; the verdict is the same on every
rank. A bad step gets a NaN-poisoned last backward: DeepSpeed's ZeRO optimizers (every
precision) then skip the whole step as an overflow; at ZeRO-0 the loop drops the gradients
itself.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

logger = logging.getLogger(__name__)


class TrainingHealthError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); one line for the user."""


class LossGuard:
    """Decides which step losses are bad and counts skipped steps; its state is checkpointed.

    A step loss is a spike when it exceeds mean + sigma * std of the last `window` accepted step
    losses, once `min_history` of them exist (PaLM-style spike skipping). After
    `max_spikes_in_a_row` spikes in a row the new level is accepted (and the statistics restart
    from it), so a lasting shift of the loss level cannot block every later update.
    """

    def __init__(
        self,
        sigma: float,
        window: int,
        min_history: int,
        max_nonfinite_in_a_row: int,
        max_spikes_in_a_row: int = 10,
    ) -> None:
        self.sigma = sigma
        self.window: deque[float] = deque(maxlen=window)
        self.min_history = min_history
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.max_spikes_in_a_row = max_spikes_in_a_row
        self.skipped_nonfinite = 0
        self.skipped_spikes = 0
        self.nonfinite_in_a_row = 0
        self.spikes_in_a_row = 0

    def threshold(self) -> float | None:
        """The loss above which a step is a spike; None while the window is too short."""
        if self.sigma <= 0 or len(self.window) < self.min_history:
            return None
        mean = sum(self.window) / len(self.window)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
        return mean + self.sigma * max(std, 1e-3 * abs(mean))

    def classify(self, step_loss: float) -> str | None:
        """'nonfinite', 'spike' or None for one global step loss (the same on every rank)."""
        if not math.isfinite(step_loss):
            return "nonfinite"
        limit = self.threshold()
        if limit is None or step_loss <= limit:
            return None
        if self.spikes_in_a_row >= self.max_spikes_in_a_row:
            logger.warning(
                "loss %.4f above the spike threshold %.4f for %d steps in a row: accepting "
                "the new level (train.spike_max_in_a_row) and restarting the spike statistics",
                step_loss,
                limit,
                self.spikes_in_a_row + 1,
            )
            self.window.clear()
            self.spikes_in_a_row = 0
            return None
        return "spike"

    def after_step(self, loss: float, skipped: bool, reason: str | None) -> None:
        """Record the outcome of a step (the same on every rank: `loss` is the global loss)."""
        if not skipped:
            self.window.append(loss)
            self.nonfinite_in_a_row = 0
            self.spikes_in_a_row = 0
            return
        if reason == "spike":
            self.skipped_spikes += 1
            self.spikes_in_a_row += 1
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
            "spikes_in_a_row": self.spikes_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.clear()
        self.window.extend(float(x) for x in state["window"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.skipped_spikes = int(state["skipped_spikes"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.spikes_in_a_row = int(state.get("spikes_in_a_row", 0))
