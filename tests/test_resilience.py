"""Checkpoints that never lie: preemption, restarts, stalls, tampering and SIGKILL during saves."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import read_metrics, small_config
from trainer import checkpoint as ckpt

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


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_two_ranks_is_bit_exact(stage: int, tmp_path: Path, corpus: Path) -> None:
    """12 steps straight == 6 steps, a crash after step 8, and a resume from step 6."""
    parallel = {"zero_stage": stage}
    straight = config_file(tmp_path, corpus, "straight", parallel=parallel)
    run(train_cmd(straight, 2))
    crashed = config_file(tmp_path, corpus, "crashed", parallel=parallel, checkpoint={"every": 6})
    run(train_cmd(crashed, 2, "--fail-at-step", "8"), expect=1)  # torchrun reports the dead ranks
    assert (tmp_path / "crashed/checkpoints/latest").read_text().strip() == "step_00000006"
    run(train_cmd(crashed, 2))
    expected, resumed = step_lines(tmp_path / "straight"), step_lines(tmp_path / "crashed")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in expected]
    assert not (tmp_path / "crashed/reshard").exists()  # same layout: DeepSpeed's native load


def test_sigterm_saves_and_the_next_launch_continues(tmp_path: Path, corpus: Path) -> None:
    config = config_file(
        tmp_path, corpus, "preempt", train={"max_steps": 100_000}, checkpoint={"every": 0}
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
    assert result.returncode != 0
    assert time.time() - started < 300
    assert (
        "timed out" in (result.stdout + result.stderr).lower()
        or "timeout" in (result.stdout + result.stderr).lower()
    )


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


def test_sigkill_during_saves_never_exposes_an_incomplete_checkpoint(
    tmp_path: Path, corpus: Path
) -> None:
    """20 launches, each resuming the last and SIGKILLed at a random moment while saving every step."""
    config = config_file(
        tmp_path, corpus, "kill", train={"max_steps": 100_000}, checkpoint={"every": 1, "keep": 3}
    )
    root = tmp_path / "kill" / "checkpoints"
    rng = random.Random(1234)
    resumed_steps = []
    for _trial in range(20):
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
