"""Side jobs of the training loop as small named hooks, each with its own checkpointed state.

The loop calls every hook at fixed points (see `Hook`); what a hook keeps in `state_dict()` goes
into the checkpoint's trainer_state.json under "hooks" -> its name. Test fault injection
(`--fail-at-step`, `--stall-at-step`, `--inject`) lives here too, as hooks the CLI adds, so the
production loop has no test arguments.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from trainer.distributed import all_reduce_sum
from trainer.objectives.base import StepOutput

if TYPE_CHECKING:
    from trainer.trainer import StepResult, Trainer

logger = logging.getLogger(__name__)


class Hook:
    """A named side job. Every method is optional; `name` keys its checkpointed state."""

    name: str = "hook"

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this process (after any resume)."""

    def on_micro_batch(self, trainer: Trainer, output: StepOutput) -> None:
        """After each micro-batch's forward, before its backward (may change the loss)."""

    def after_step(self, trainer: Trainer, result: StepResult) -> bool:
        """After each optimizer step and its logging; True if the hook rewound the loop
        (e.g. a rollback), so this step's eval and save do not happen."""
        return False

    def after_checkpoint_schedule(self, trainer: Trainer) -> None:
        """After the step's scheduled eval and save."""

    def stop_requested(self) -> bool:
        """This rank wants the run to stop now (saving first); agreed over ranks by the loop."""
        return False

    def on_train_end(self, trainer: Trainer) -> None:
        """After the final save (not when training failed)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class Preemption(Hook):
    """SIGTERM (preemption, torchrun shutdown) and SIGUSR1 (SLURM's warning) request a stop;
    the loop saves a checkpoint and exits cleanly."""

    name = "preemption"

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum: int, _frame: object) -> None:
            self.signal = signum

        self._previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)
        }

    def stop_requested(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        """Put the process's previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class SpikeRollback(Hook):
    """PaLM-style: on a loss spike (all ranks agree), reload the latest complete checkpoint but
    keep the data position, so the batches since that checkpoint, the spike's included, are
    never trained on again. Without a checkpoint, or once `train.max_rollbacks` is reached,
    the spike's update is only skipped."""

    name = "spike_rollback"

    def __init__(self, enabled: bool, max_rollbacks: int) -> None:
        self.enabled = enabled
        self.max_rollbacks = max_rollbacks
        self.rollbacks = 0
        self.skipped_batches = 0  # batches whose updates a rollback discarded

    def metrics(self) -> dict[str, int]:
        return {"rollbacks": self.rollbacks, "rollback_skipped_batches": self.skipped_batches}

    def after_step(self, trainer: Trainer, result: StepResult) -> bool:
        if not (result.spike and self.enabled):
            return False
        main = trainer.env.is_main
        if self.rollbacks >= self.max_rollbacks:
            if main:
                logger.warning(
                    "loss spike at step %d: train.max_rollbacks=%d reached; skipping the update only",
                    trainer.step,
                    self.max_rollbacks,
                )
            return False
        spike_step = trainer.step
        folder = trainer.roll_back_to_latest_checkpoint()
        if folder is None:
            if main:
                logger.warning(
                    "loss spike at step %d: no checkpoint to roll back to; skipping the update only",
                    spike_step,
                )
            return False
        self.rollbacks += 1
        self.skipped_batches += spike_step - trainer.step
        if main:
            logger.warning(
                "loss spike at step %d: rolled back to %s (rollback %d of at most %d); "
                "skipping the %d batches since it",
                spike_step,
                folder.name,
                self.rollbacks,
                self.max_rollbacks,
                spike_step - trainer.step,
            )
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "skipped_batches": self.skipped_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A rollback keeps its counters (they record what happened); a resume restores them.
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skipped_batches = int(state.get("skipped_batches", 0))


class EndOfRunSample(Hook):
    """Rank 0 prints a sample from the final checkpoint (`train.sample_prompt`)."""

    name = "sample"

    def on_train_end(self, trainer: Trainer) -> None:
        train = trainer.config.train
        if not (trainer.env.is_main and train.sample_prompt) or trainer.preempted:
            return
        from model.generation import generate
        from trainer.inference import load_checkpoint_model

        loaded = load_checkpoint_model(str(trainer.checkpoint_root))
        ids = generate(
            loaded.model,
            loaded.tokenizer.encode(train.sample_prompt),
            train.sample_tokens,
            temperature=train.sample_temperature,
            top_p=train.sample_top_p,
            stop_ids=loaded.tokenizer.stop_ids,
            seed=trainer.config.run.seed,
        )
        how = (
            "greedy"
            if train.sample_temperature <= 0
            else f"temperature {train.sample_temperature}, top-p {train.sample_top_p}"
        )
        print(f"--- sample ({loaded.folder.name}, {how}) ---")
        print(train.sample_prompt + loaded.tokenizer.decode(ids))
        print("---")


# ---------------------------------------------------------------------------- test faults
class FailAtStep(Hook):
    """Test hook `--fail-at-step N`: exit hard after step N (first attempt only, so a torchrun
    restart can finish the run): no cleanup, no final save."""

    name = "fail_at_step"

    def __init__(self, step: int) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.step = step if first_attempt else None

    def after_checkpoint_schedule(self, trainer: Trainer) -> None:
        if self.step is not None and trainer.step == self.step:
            os._exit(17)


class StallAtStep(Hook):
    """Test hook `--stall-at-step N`: rank 1 hangs after step N; the others must time out."""

    name = "stall_at_step"

    def __init__(self, step: int) -> None:
        self.step = step

    def after_checkpoint_schedule(self, trainer: Trainer) -> None:
        if trainer.step == self.step and trainer.env.rank == 1:
            time.sleep(10**6)


def parse_injections(spec: str | None) -> tuple[set[int], set[int]]:
    """`nan@3,spike@7` -> ({3}, {7}): steps whose loss becomes NaN / 50x on rank 0."""
    nan_steps: set[int] = set()
    spike_steps: set[int] = set()
    for item in (spec or "").split(","):
        if not item:
            continue
        kind, _, step = item.partition("@")
        (nan_steps if kind == "nan" else spike_steps).add(int(step))
    return nan_steps, spike_steps


class InjectLoss(Hook):
    """Test hook `--inject nan@3,spike@7`: rank 0's loss (and its reported value) becomes NaN /
    50x at those steps. Each fault happens once: a rollback that replays the step does not
    meet it again (the fired steps are checkpointed)."""

    name = "inject"

    def __init__(self, spec: str | None) -> None:
        self.nan_steps, self.spike_steps = parse_injections(spec)
        self.fired: set[int] = set()
        self.injected: int | None = None  # the step being injected into

    def on_micro_batch(self, trainer: Trainer, output: StepOutput) -> None:
        step = trainer.step + 1
        if trainer.env.rank != 0 or step in self.fired:
            return
        factor = (
            float("nan") if step in self.nan_steps else 50.0 if step in self.spike_steps else 1.0
        )
        if factor != 1.0:
            output.loss = output.loss * factor
            output.metrics["loss"].value *= factor
            self.injected = step

    def after_step(self, trainer: Trainer, result: StepResult) -> bool:
        # Not trainer.step: a rollback hook may have rewound it already.
        if self.injected is not None:
            self.fired.add(self.injected)
            self.injected = None
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"fired": sorted(self.fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired = {int(s) for s in state.get("fired", [])}


def fault_injection_hooks(
    fail_at_step: int | None, stall_at_step: int | None, inject: str | None
) -> list[Hook]:
    """The fault-injection hooks the CLI's test flags ask for."""
    hooks: list[Hook] = []
    if inject:
        hooks.append(InjectLoss(inject))
    if fail_at_step is not None:
        hooks.append(FailAtStep(fail_at_step))
    if stall_at_step is not None:
        hooks.append(StallAtStep(stall_at_step))
    return hooks


def stop_agreed(hooks: list[Hook], device: Any) -> bool:
    """True on every rank as soon as any hook of any rank requests a stop (one all-reduce)."""
    wanted = any(hook.stop_requested() for hook in hooks)
    (requested,) = all_reduce_sum([1.0 if wanted else 0.0], device)
    return requested > 0
