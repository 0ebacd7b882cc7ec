"""Checkpoints that never lie: preemption, restarts, stalls, tampering and SIGKILL during saves."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import TINY_MOE_MODEL as TINY_MOE
from tests.helpers import read_metrics, small_config
from trainer.checkpointing import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**clean, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def config_file(tmp_path: Path, corpus: Path, name: str, **sections: dict) -> Path:
    train = {"max_steps": 12, "eval_every": 0, **sections.pop("train", {})}
    raw = small_config(tmp_path / name, corpus, train=train, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_cmd(config: Path, nproc: int = 1, *extra: str, restarts: int = 0) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "launch.cli", "train", str(config), *extra]
    return [
        str(BIN / "torchrun"),
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}",
        "-m",
        "launch.cli",
        "train",
        str(config),
        *extra,
    ]


def run(cmd: list[str], expect: int = 0, timeout: int = 420) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=timeout
    )
    assert result.returncode == expect, (
        f"{' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return result


def step_lines(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)[0]


MOE_MODEL = {
    **TINY_MOE,
    "aux_free_bias_update_rate": 0.01,  # the router's bias must resume too
}
MODELS = {"tiny": {}, "tiny-moe": MOE_MODEL}


def resume_config(
    tmp_path: Path, corpus: Path, name: str, model: str, stage: int, **sections: dict
) -> Path:
    return config_file(
        tmp_path,
        corpus,
        name,
        model=MODELS[model],
        train={"max_steps": 24},
        parallel={"zero_stage": stage},
        **sections,
    )


@pytest.fixture(scope="module")
def straight_run(
    tmp_path_factory: pytest.TempPathFactory, corpus: Path
) -> Callable[[str, int, int], Path]:
    """24 uninterrupted steps per (model, ranks, ZeRO stage), run once per module."""
    runs: dict[tuple[str, int, int], Path] = {}

    def get(model: str, nproc: int, stage: int) -> Path:
        if (model, nproc, stage) not in runs:
            tmp = tmp_path_factory.mktemp(f"straight-{model}-{nproc}-{stage}")
            run(train_cmd(resume_config(tmp, corpus, "straight", model, stage), nproc))
            runs[model, nproc, stage] = tmp / "straight"
        return runs[model, nproc, stage]

    return get


def assert_same_run(expected: Path, resumed: Path) -> None:
    """Same losses and grad norms at every step and the same final weights, bit for bit."""
    from safetensors.torch import load_file

    want, got = step_lines(expected), step_lines(resumed)
    assert [r["step"] for r in got] == list(range(1, 25))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
    final = "checkpoints/step_00000024/model.safetensors"
    want_weights, got_weights = load_file(expected / final), load_file(resumed / final)
    assert want_weights.keys() == got_weights.keys()
    for key, tensor in want_weights.items():
        assert torch.equal(tensor, got_weights[key]), key  # router bias and load buffers too


@pytest.mark.parametrize(
    ("model", "nproc", "stage"),
    [
        pytest.param("tiny", 1, 0, marks=pytest.mark.slow),  # test_training covers 1 rank
        # tiny-moe on 2 ranks covers the 2-rank path in CI (test_distributed the dense model).
        pytest.param("tiny", 2, 2, marks=pytest.mark.slow),
        pytest.param("tiny", 2, 3, marks=pytest.mark.slow),
        ("tiny-moe", 1, 0),
        ("tiny-moe", 2, 2),
        pytest.param("tiny-moe", 2, 3, marks=pytest.mark.slow),
    ],
)
def test_resume_is_bit_exact(
    model: str,
    nproc: int,
    stage: int,
    tmp_path: Path,
    corpus: Path,
    straight_run: Callable[[str, int, int], Path],
) -> None:
    """24 steps straight == 12 steps, a process exit, and 12 resumed steps (fp32)."""
    config = resume_config(tmp_path, corpus, "resumed", model, stage, checkpoint={"every": 12})
    run(train_cmd(config, nproc, "--fail-at-step", "12"), expect=17 if nproc == 1 else 1)
    assert (tmp_path / "resumed/checkpoints/latest").read_text().strip() == "step_00000012"
    result = run(train_cmd(config, nproc))
    assert "resumed from" in result.stderr
    assert not (tmp_path / "resumed/reshard").exists()  # same layout: DeepSpeed's native load
    assert_same_run(straight_run(model, nproc, stage), tmp_path / "resumed")


@pytest.mark.parametrize(("nproc", "stage"), [(1, 0), (2, 2)])
def test_async_save_resumes_bit_exactly(
    nproc: int,
    stage: int,
    tmp_path: Path,
    corpus: Path,
    straight_run: Callable[[str, int, int], Path],
) -> None:
    """Async saves every 6 steps, a crash right after the step-12 save began, then a resume."""
    config = resume_config(
        tmp_path, corpus, "async", "tiny", stage, checkpoint={"every": 6, "async_save": True}
    )
    result = run(train_cmd(config, nproc, "--fail-at-step", "12"), expect=17 if nproc == 1 else 1)
    assert "training blocked" in result.stderr and "(writing in the background)" in result.stderr
    root = tmp_path / "async/checkpoints"
    # The crash hit the step-12 save in flight: published completely, or only a temporary folder.
    latest = (root / "latest").read_text().strip()
    assert latest in ("step_00000006", "step_00000012")
    if latest == "step_00000006":
        assert not (root / "step_00000012").exists()
    for folder in ckpt.complete_checkpoints(root):
        ckpt.verify_checkpoint(folder)
    assert not list(root.glob("step_*/.ranks")) and not list(root.glob("step_*/**/*.ok"))
    result = run(train_cmd(config, nproc))
    assert f"resumed from {root / latest}" in result.stderr
    assert not list(root.glob(".tmp-*"))  # the interrupted save was cleaned up
    assert_same_run(straight_run("tiny", nproc, stage), tmp_path / "async")
    manifest = ckpt.verify_checkpoint(root / "step_00000024")
    assert "deepspeed/mp_rank_00_model_states.pt" in manifest["files"]
    assert all(f"rng/rank_{rank:05d}.pt" in manifest["files"] for rank in range(nproc))


@pytest.mark.parametrize("async_save", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sigterm_saves_and_the_next_launch_continues(
    async_save: bool, tmp_path: Path, corpus: Path
) -> None:
    """Async: saves every 2 steps are in flight when the signal comes; the final one waits."""
    checkpoint = {"every": 2, "async_save": True} if async_save else {"every": 0}
    config = config_file(
        tmp_path, corpus, "preempt", train={"max_steps": 100_000}, checkpoint=checkpoint
    )
    process = subprocess.Popen(
        train_cmd(config),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "preempt" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "saving at step" in stderr
    saved = ckpt.find_resume_checkpoint(tmp_path / "preempt" / "checkpoints")
    assert saved is not None
    stopped_at = int(saved.name.removeprefix("step_"))
    assert stopped_at >= 3
    assert not list((tmp_path / "preempt" / "checkpoints").glob(".tmp-*"))
    assert stopped_at == max(r["step"] for r in step_lines(tmp_path / "preempt"))
    raw = yaml.safe_load(config.read_text())
    raw["train"]["max_steps"] = stopped_at + 2
    config.write_text(yaml.safe_dump(raw))
    result = run(train_cmd(config))
    assert f"resumed from {saved}" in result.stderr
    assert [r["step"] for r in step_lines(tmp_path / "preempt")] == list(range(1, stopped_at + 3))


def test_killed_rank_under_torchrun_max_restarts_finishes(tmp_path: Path, corpus: Path) -> None:
    config = config_file(tmp_path, corpus, "restart", checkpoint={"every": 4})
    result = run(train_cmd(config, 2, "--fail-at-step", "6", restarts=1))
    assert "resumed from" in result.stderr
    lines = step_lines(tmp_path / "restart")
    assert [r["step"] for r in lines] == list(
        range(1, 13)
    )  # steps 5-6 of the first attempt replaced
    assert (tmp_path / "restart/checkpoints/latest").read_text().strip() == "step_00000012"


def test_a_stalled_rank_fails_the_job_within_the_timeout(tmp_path: Path, corpus: Path) -> None:
    config = config_file(tmp_path, corpus, "stall", parallel={"step_timeout_s": 5.0})
    started = time.time()
    result = subprocess.run(
        train_cmd(config, 2, "--stall-at-step", "3"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env(),
        timeout=400,
    )
    assert result.returncode == 1  # torchrun's status when a rank fails
    assert time.time() - started < 300
    # The waiting rank 0 fails in its collective after exactly the configured 5 s (not the
    # setup timeout), and is the root cause; the stalled rank 1 is then stopped by torchrun.
    assert re.search(
        r"\[rank0\]: RuntimeError: .*Timed out waiting 5000ms for recv", result.stderr
    ), result.stderr[-3000:]
    root_cause = result.stderr.split("Root Cause (first observed failure):")[-1]
    assert re.search(r"rank\s*: 0 .*\n.*exitcode\s*: 1 ", root_cause), root_cause


def test_tampered_state_file_is_refused_and_resume_falls_back(tmp_path: Path, corpus: Path) -> None:
    config = config_file(
        tmp_path, corpus, "tamper", train={"max_steps": 2}, checkpoint={"every": 1, "keep": 0}
    )
    run(train_cmd(config))
    root = tmp_path / "tamper" / "checkpoints"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    import pickle

    states = next((root / "step_00000002" / "deepspeed").rglob("*model_states.pt"))
    states.write_bytes(pickle.dumps(Evil()))
    raw = yaml.safe_load(config.read_text())
    raw["train"]["max_steps"] = 3
    config.write_text(yaml.safe_dump(raw))
    result = run(train_cmd(config))
    assert f"{states}: size" in result.stderr or f"{states}: SHA-256" in result.stderr
    assert "falling back" in result.stderr
    assert f"resumed from {root / 'step_00000001'}" in result.stderr
    assert not marker.exists()

    # With every checkpoint damaged, auto-resume refuses instead of silently starting over.
    for weights in root.glob("step_*/model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    result = run(train_cmd(config), expect=2)
    assert "no checkpoint in" in result.stderr and "verifies" in result.stderr


@pytest.mark.parametrize(
    ("async_save", "launches"), [(False, 20), pytest.param(True, 20, marks=pytest.mark.slow)]
)
def test_sigkill_during_saves_never_exposes_an_incomplete_checkpoint(
    async_save: bool, launches: int, tmp_path: Path, corpus: Path
) -> None:
    """Launches each resuming the last and SIGKILLed at a random moment while saving every step."""
    checkpoint = {"every": 1, "keep": 3, "async_save": async_save}
    config = config_file(
        tmp_path, corpus, "kill", train={"max_steps": 100_000}, checkpoint=checkpoint
    )
    root = tmp_path / "kill" / "checkpoints"
    rng = random.Random(1234)
    resumed_steps = []
    for _trial in range(launches):
        before = ckpt.find_resume_checkpoint(root)
        process = subprocess.Popen(
            train_cmd(config),
            cwd=ROOT,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while time.time() < deadline and ckpt.find_resume_checkpoint(root) == before:
            time.sleep(0.05)  # until this launch published a checkpoint of its own
        time.sleep(rng.uniform(0.0, 1.0))
        process.kill()
        process.wait()
        latest = root / (root / "latest").read_text().strip()
        ckpt.verify_checkpoint(latest)  # `latest` always names a complete, intact checkpoint
        for folder in ckpt.complete_checkpoints(root):
            ckpt.verify_checkpoint(folder)
        resumed_steps.append(int(latest.name.removeprefix("step_")))
    assert resumed_steps == sorted(resumed_steps) and resumed_steps[-1] > resumed_steps[0]


@pytest.mark.slow  # tests/test_reshard.py covers world-size changes in CI
def test_zero0_checkpoint_resumes_on_another_world_size(tmp_path: Path, corpus: Path) -> None:
    """1 -> 2 and 2 -> 1 ranks: the losses after resume equal the uninterrupted run's."""
    straight = config_file(tmp_path, corpus, "ws_straight", train={"max_steps": 8})
    run(train_cmd(straight))
    expected = [r["loss"] for r in step_lines(tmp_path / "ws_straight")]
    for name, first, second in (("one_to_two", 1, 2), ("two_to_one", 2, 1)):
        config = config_file(
            tmp_path, corpus, name, train={"max_steps": 8}, checkpoint={"every": 4}
        )
        run(train_cmd(config, first, "--fail-at-step", "5"), expect=17 if first == 1 else 1)
        result = run(train_cmd(config, second))
        assert "resumed from" in result.stderr
        assert [r["loss"] for r in step_lines(tmp_path / name)] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("nproc", "stage"), [(1, 0), (2, 2)])
def test_nan_loss_skips_the_update_on_every_rank(
    nproc: int, stage: int, tmp_path: Path, corpus: Path
) -> None:
    config = config_file(
        tmp_path, corpus, "nan", train={"max_steps": 6}, parallel={"zero_stage": stage}
    )
    run(train_cmd(config, nproc, "--inject", "nan@3"))  # rank 0's loss is NaN at step 3
    lines = step_lines(tmp_path / "nan")
    assert [r["skipped_update"] for r in lines] == [False, False, True, False, False, False]
    assert lines[2]["loss"] is None  # NaN is written as null
    assert lines[-1]["skipped_nonfinite"] == 1 and lines[-1]["skipped_spikes"] == 0
    assert all(r["loss"] is not None for r in lines[3:])
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "nan/checkpoints/step_00000006/model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_loss_spike_is_skipped_and_counted(tmp_path: Path, corpus: Path) -> None:
    train = {"max_steps": 8, "spike_min_history": 3, "spike_window": 10}
    config = config_file(tmp_path, corpus, "spike", train=train)
    run(train_cmd(config, 1, "--inject", "spike@6"))
    lines = step_lines(tmp_path / "spike")
    assert [r["step"] for r in lines if r["skipped_update"]] == [6]
    assert lines[-1]["skipped_spikes"] == 1 and lines[-1]["skipped_nonfinite"] == 0
    state = (tmp_path / "spike/checkpoints/step_00000008/trainer_state.json").read_text()
    assert '"skipped_spikes": 1' in state  # the guard's state survives a resume


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path: Path, corpus: Path) -> None:
    config = config_file(
        tmp_path, corpus, "nans", train={"max_steps": 8, "max_nonfinite_in_a_row": 3}
    )
    result = run(train_cmd(config, 1, "--inject", "nan@2,nan@3,nan@4"), expect=2)
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "scaletrain: error: 3 steps in a row had a non-finite loss or gradient; stopping"
        )
    )


def test_spike_rollback_reloads_the_checkpoint_and_skips_its_batches(
    tmp_path: Path, corpus: Path
) -> None:
    """spike@6 rolls back to step 4 with the data at batch 7; a crash at step 8 and a resume
    keep the rollback count, so the spike at step 9 meets the cap and is only skipped."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.trainer import Trainer

    train = {
        "max_steps": 10,
        "spike_min_history": 3,
        "spike_window": 10,
        "spike_rollback": True,
        "max_rollbacks": 1,
    }
    config = config_file(
        tmp_path, corpus, "rollback", train=train, checkpoint={"every": 4, "keep": 0}
    )
    first = run(
        train_cmd(config, 1, "--inject", "spike@6,spike@9", "--fail-at-step", "8"), expect=17
    )
    assert (
        "loss spike at step 6: rolled back to step_00000004 (rollback 1 of at most 1); "
        "skipping the 2 batches since it" in first.stderr
    )
    second = run(train_cmd(config, 1, "--inject", "spike@6,spike@9"))
    assert "resumed from" in second.stderr and "step_00000008" in second.stderr
    assert "loss spike at step 9: train.max_rollbacks=1 reached; skipping the update only" in (
        second.stderr
    )
    lines = step_lines(tmp_path / "rollback")
    batch_tokens = 512
    # Steps 1-6, then 5-10 again after the rollback; the data never goes back.
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    assert [r["tokens"] for r in lines] == [batch_tokens * i for i in range(1, 13)]
    assert [r["rollbacks"] for r in lines] == [0] * 6 + [1] * 6
    assert [r["rollback_skipped_batches"] for r in lines] == [0] * 6 + [2] * 6
    assert [r["step"] for r in lines if r["skipped_update"]] == [6, 9]
    assert lines[-1]["skipped_spikes"] == 2
    state = (tmp_path / "rollback/checkpoints/step_00000010/trainer_state.json").read_text()
    assert '"rollbacks": 1' in state and '"skipped_batches": 2' in state

    # Reference: start from the step-4 checkpoint with the data advanced past batches 5 and 6.
    reference_dir = tmp_path / "reference"
    for part in ("checkpoints/step_00000004", "tokenizer"):
        shutil.copytree(tmp_path / "rollback" / part, reference_dir / part)
    raw = yaml.safe_load(config.read_text())
    raw["run"]["dir"] = str(reference_dir)
    raw["train"]["spike_rollback"] = False
    raw["checkpoint"]["every"] = 0
    trainer = Trainer(job_config_from_dict(raw), detect_environment())
    trainer.setup()
    assert trainer.step == 4
    trainer.loader.next_batch()
    trainer.loader.next_batch()
    trainer.fit()
    reference = step_lines(reference_dir)
    assert [r["step"] for r in reference] == [5, 6, 7, 8, 9, 10]
    # Equal until step 9, where the rolled-back run met its second (injected) spike.
    assert [r["loss"] for r in lines[6:10]] == [r["loss"] for r in reference[:4]]
    assert [r["grad_norm"] for r in lines[6:10]] == [r["grad_norm"] for r in reference[:4]]


def test_spike_rollback_on_two_ranks_with_async_saves(tmp_path: Path, corpus: Path) -> None:
    """Rank 0 alone sees the spike; both ranks roll back together, after the in-flight save."""
    train = {"max_steps": 8, "spike_min_history": 3, "spike_window": 10, "spike_rollback": True}
    config = config_file(
        tmp_path,
        corpus,
        "rollback2",
        train=train,
        parallel={"zero_stage": 2},
        checkpoint={"every": 4, "keep": 0, "async_save": True},
    )
    result = run(train_cmd(config, 2, "--inject", "spike@6"))
    assert "loss spike at step 6: rolled back to step_00000004" in result.stderr
    lines = step_lines(tmp_path / "rollback2")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert [r["tokens"] for r in lines] == [512 * i for i in range(1, 11)]
    assert lines[-1]["rollbacks"] == 1 and lines[-1]["rollback_skipped_batches"] == 2
    root = tmp_path / "rollback2/checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == [
        "step_00000004",
        "step_00000008",
    ]
    for folder in ckpt.complete_checkpoints(root):
        ckpt.verify_checkpoint(folder)
