"""#18: the checkpoint's RNG states are observable in training. LoRA dropout draws its masks from
torch's global RNG in every training forward, so a LoRA-dropout run resumed after a crash is
bit-exact only if the RNG state comes back; replacing the restore by a no-op breaks it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests import post_training_stages
from tests.helpers import read_metrics, small_config
from trainer.checkpointing import checkpoint as ckpt
from trainer.hooks import Hook

STEPS, CRASH = 6, 3


class CrashAt(Hook):
    """Raise after step `step`'s save: the run dies with its checkpoint written."""

    name = "crash"

    def __init__(self, step: int) -> None:
        self.step = step

    def after_checkpoint_schedule(self, trainer: Any) -> None:
        if trainer.step == self.step:
            raise RuntimeError("crash for the test")


def lora_config(run_dir: Path, corpus: Path, dropout: float = 0.1) -> dict[str, Any]:
    raw = small_config(
        run_dir,
        corpus,
        train={"max_steps": STEPS, "eval_every": 0, "lr": 2e-2, "warmup_steps": 0},
        checkpoint={"every": CRASH, "keep": 3},
    )
    raw["lora"] = {"rank": 4, "alpha": 8.0, "dropout": dropout, "targets": ["q_proj", "v_proj"]}
    return raw


def losses(run_dir: Path) -> list[float]:
    train, _ = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    return [r["loss"] for r in train]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")


def crash_and_resume(raw: dict[str, Any], monitors: bool = False) -> Path:
    with pytest.raises(RuntimeError, match="crash for the test"):
        post_training_stages.train_in_process(
            raw, "lora_pretrain", hooks=[CrashAt(CRASH)], monitors=monitors
        )
    post_training_stages.train_in_process(raw, "lora_pretrain", monitors=monitors)
    return Path(raw["run"]["dir"])


def with_monitors(raw: dict[str, Any], corpus: Path) -> dict[str, Any]:
    """Evals every step with both monitors: sampling and retain evals between the steps."""
    raw["train"]["eval_every"] = 1
    raw["monitor"] = {
        "retain": [{"path": str(corpus / "validation.jsonl"), "name": "retain"}],
        "prompts": ["def ", "x = "],
        "samples": 2,
        "max_new_tokens": 6,
    }
    return raw


def test_lora_dropout_run_resumes_bit_exactly_only_with_the_rng_state(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = tmp_path / "straight"
    post_training_stages.train_in_process(
        lora_config(straight, corpus), "lora_pretrain", monitors=False
    )
    # The resumed run also samples and evaluates at every step: the monitors' seeded sampling
    # and eval forwards must not touch the global RNG the dropout masks come from.
    resumed = crash_and_resume(
        with_monitors(lora_config(tmp_path / "resumed", corpus), corpus), monitors=True
    )
    assert (resumed / "samples.jsonl").is_file()
    assert losses(resumed) == losses(straight)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and any(n.endswith("lora_B") for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # Negative control: the same crash and resume with the RNG restore replaced by a no-op.
    monkeypatch.setattr(ckpt, "restore_rng_state", lambda state: None)
    broken = crash_and_resume(lora_config(tmp_path / "broken", corpus))
    expected, got = losses(straight), losses(broken)
    assert got[:CRASH] == expected[:CRASH]  # before the crash nothing differs
    assert all(g != e for g, e in zip(got[CRASH:], expected[CRASH:], strict=True))
