"""`scaletrain distill`: the stage on the one loop, end to end on a tiny teacher."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers import read_metrics, small_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The student of the size tests: a quarter of the teacher's width, one layer.
STUDENT_MODEL = {"preset": "tiny", "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}


def train(raw: dict[str, Any], stage: str = "pretrain") -> Path:
    """One run in this process; returns its run dir."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.stages import get_stage
    from trainer.trainer import Trainer

    get_stage(stage)  # registers the stage's sections
    trainer = Trainer(job_config_from_dict(raw, stage=stage), detect_environment(), stage)
    trainer.setup()
    trainer.fit()
    return Path(raw["run"]["dir"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A 2-layer dim-64 model pretrained for 40 steps on the synthetic corpus (its run dir)."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    raw = small_config(run_dir, corpus, train={"max_steps": 40, "eval_every": 0})
    return train(raw)


def distill_config(run_dir: Path, corpus: Path, teacher: Path, **distill: Any) -> dict[str, Any]:
    raw = small_config(run_dir, corpus, model=dict(STUDENT_MODEL))
    raw["model"] = dict(STUDENT_MODEL)
    raw["distill"] = {"teacher": str(teacher), **distill}
    return raw


def cli(stage: str, config: dict[str, Any], tmp_path: Path, *extra: str):
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", stage, str(path), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_is_zero_when_the_student_is_the_teacher(
    tmp_path: Path, corpus: Path, teacher: Path, loss: str
) -> None:
    """Student initialised from the teacher's checkpoint, kd_weight 1, T = 1: the first step's
    kd_loss is 0 (1e-6), while its ce_loss is the teacher's own loss (> 1: not vacuous)."""
    raw = small_config(tmp_path / "same", corpus, train={"max_steps": 1, "eval_every": 0})
    raw["model"] = {"init_from": str(teacher)}
    raw["distill"] = {"teacher": str(teacher), "loss": loss, "kd_weight": 1.0, "temperature": 1.0}
    lines, _ = read_metrics(train(raw, "distill"))
    first = lines[0]
    assert abs(first["kd_loss"]) < 1e-6, first
    assert first["loss"] == pytest.approx(first["kd_loss"], abs=1e-12)
    assert first["ce_loss"] > 1.0, first  # the same step's CE: far from 0


def test_a_small_student_approaches_the_teacher(
    tmp_path: Path, corpus: Path, teacher: Path
) -> None:
    """A student at a quarter of the width learns from the teacher alone (kd_weight 1): its
    eval-loss gap to the teacher shrinks at least 2.5x in 24 steps (measured 3.1x: teacher
    2.336, student 5.784 -> 3.440; kd_loss 1.860 -> 0.326)."""
    from trainer.inference import evaluate_source, load_checkpoint_model

    raw = distill_config(tmp_path / "student", corpus, teacher, temperature=1.0)
    raw["train"] |= {"max_steps": 24, "eval_every": 24, "lr": 1e-2}
    lines, evals = read_metrics(train(raw, "distill"))
    teacher_loss, _ = evaluate_source(
        load_checkpoint_model(teacher),
        str(corpus / "validation.jsonl"),
        "validation",
        max_sequences=2 * 8,
    )
    start, end = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    gap_start, gap_end = start - teacher_loss, end - teacher_loss
    message = (
        f"teacher {teacher_loss:.3f}; student step 0 {start:.3f} (gap {gap_start:.3f}), "
        f"step 24 {end:.3f} (gap {gap_end:.3f}, {gap_start / gap_end:.1f}x smaller); "
        f"kd_loss {lines[0]['kd_loss']:.3f} -> {lines[-1]['kd_loss']:.3f}"
    )
    print(message)
    assert [e["step"] for e in evals] == [0, 24]
    assert gap_end < gap_start / 2.5, message
    assert lines[-1]["kd_loss"] < 0.5 * lines[0]["kd_loss"], message


def _final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def _assert_same_run(expected_dir: Path, resumed_dir: Path, steps: int) -> None:
    expected, _ = read_metrics(expected_dir)
    resumed, _ = read_metrics(resumed_dir)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(expected, resumed, strict=True):
        assert (a["loss"], a["kd_loss"], a["ce_loss"]) == (b["loss"], b["kd_loss"], b["ce_loss"])
    want, got = _final_weights(expected_dir, steps), _final_weights(resumed_dir, steps)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def _resumable(run_dir: Path, corpus: Path, teacher: Path) -> dict[str, Any]:
    raw = distill_config(run_dir, corpus, teacher, kd_weight=0.5)
    raw["train"] |= {"max_steps": 8, "eval_every": 0}
    raw["checkpoint"] = {"every": 4, "keep": 2}
    return raw


def test_resume_from_a_checkpoint_is_bit_exact_and_checks_the_teacher(
    tmp_path: Path, corpus: Path, teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run resumed from its step-4 checkpoint (step 8's removed) ends with the losses and
    weights of the uninterrupted run, bit for bit. The teacher's SHA-256 is in the objective's
    state: resuming with other teacher weights is refused with one line (exit 2)."""
    from launch.cli import main
    from trainer.checkpointing import checkpoint as ckpt
    from trainer.inference import read_checkpoint_weights, resolve_checkpoint

    straight = train(_resumable(tmp_path / "straight", corpus, teacher), "distill")
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    train(_resumable(resumed, corpus, teacher), "distill")
    _assert_same_run(straight, resumed, 8)

    # The same teacher checkpoint with one weight 1% off (a valid, re-manifested checkpoint).
    source = resolve_checkpoint(teacher)
    other = tmp_path / "other_teacher"
    shutil.copytree(source, other)
    changed = read_checkpoint_weights(source)
    changed["norm.weight"] = changed["norm.weight"] * 1.01
    save_file(changed, other / "model.safetensors")
    manifest = ckpt.verify_checkpoint(source)
    ckpt.write_manifest(other, {k: v for k, v in manifest.items() if k != "files"})
    # Control: the original teacher resumes the run (to step 9) ...
    raw = _resumable(resumed, corpus, teacher)
    raw["train"]["max_steps"] = 9
    train(raw, "distill")
    # ... the changed one is refused before a step.
    raw["distill"]["teacher"] = str(other)
    raw["train"]["max_steps"] = 10
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["distill", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(
        "scaletrain: error: distill.teacher: its weights (sha256 "
    ) and error[-1].endswith("start a new run.dir"), error
    assert read_metrics(resumed)[0][-1]["step"] == 9


@pytest.mark.slow
def test_resume_after_a_crash_is_bit_exact(tmp_path: Path, corpus: Path, teacher: Path) -> None:
    """`scaletrain distill --fail-at-step 5` dies after step 5 (checkpoint at 4); the rerun
    resumes and ends equal, bit for bit, to an uninterrupted run (subprocesses: ~60 s)."""
    straight = tmp_path / "straight"
    assert cli("distill", _resumable(straight, corpus, teacher), tmp_path).returncode == 0
    crashed = _resumable(tmp_path / "crashed", corpus, teacher)
    assert cli("distill", crashed, tmp_path, "--fail-at-step", "5").returncode == 17
    assert (tmp_path / "crashed/checkpoints/latest").read_text().strip() == "step_00000004"
    result = cli("distill", crashed, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    _assert_same_run(straight, tmp_path / "crashed", 8)


def test_a_teacher_with_another_tokenizer_is_refused(
    tmp_path: Path, corpus: Path, teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run trains its own 360-piece tokenizer; the teacher's has 320: one line, exit 2,
    before any model is built."""
    from launch.cli import main

    raw = distill_config(tmp_path / "run", corpus, teacher)
    raw["tokenizer"] = {"vocab_size": 360}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == (
        f"scaletrain: error: distill.teacher: {teacher} has another tokenizer (320 pieces, the "
        "run's has 360); distillation needs the student and teacher on one tokenizer"
    ), error
    assert not any("Traceback" in line for line in error)
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before the model


def test_tokenizer_difference_is_none_for_the_same_and_names_the_size_otherwise(
    tmp_path: Path, corpus: Path, teacher: Path
) -> None:
    from data_pipeline.tokenizer import Tokenizer
    from trainer.distill import tokenizer_difference
    from trainer.inference import resolve_checkpoint

    ours = Tokenizer.load(resolve_checkpoint(teacher))
    assert tokenizer_difference(ours, ours) is None
    swapped = ours.with_special_tokens(["<|extra|>"])
    assert "pieces" in str(tokenizer_difference(swapped, ours))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_at_zero_2_and_3_equal_one_rank(
    tmp_path: Path, corpus: Path, teacher: Path, zero_stage: int
) -> None:
    """The same distillation on 1 rank and on 2 ranks at ZeRO-2/3 (torchrun, gloo): equal
    losses and final weights (1e-5 relative). The student is 320 wide so that its embedding
    and output head (320 x 320 > 1e5 elements, DeepSpeed's persistence threshold) really are
    partitioned at ZeRO-3: the chunked losses must see the gathered output weight. At ZeRO-3
    the teacher is sharded too (its output matrix kept whole; tests/test_sharded_teacher.py).
    Negative control (by hand): the losses computed outside the engine's forward fail here
    at ZeRO-3 with "student vocabulary 0" (the head still partitioned).
    Measured: weights 1.7e-7 (ZeRO-2) and 2.9e-6 (ZeRO-3) relative apart (2.9e-6 with the
    teacher whole too: the sharding changes no bit of the losses)."""
    student = {**STUDENT_MODEL, "dim": 320, "n_heads": 4, "n_kv_heads": 2}
    single = distill_config(tmp_path / "single", corpus, teacher, kd_weight=0.7, loss="jsd")
    single["model"] = dict(student)
    single["train"] |= {"max_steps": 3, "eval_every": 0, "micro_batch_size": 2}
    train(single, "distill")
    double = distill_config(tmp_path / "double", corpus, teacher, kd_weight=0.7, loss="jsd")
    double["model"] = dict(student)
    double["train"] |= {"max_steps": 3, "eval_every": 0, "micro_batch_size": 2}
    double["parallel"]["zero_stage"] = zero_stage
    path = tmp_path / "double.yaml"
    path.write_text(yaml.safe_dump(double))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "launch.cli",
            "distill",
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sharded = re.search(
        r"teacher sharded over 2 ranks \(ZeRO-3\): (\d+) of its (\d+)", result.stderr
    )
    assert (sharded is not None) == (zero_stage == 3), result.stderr[-3000:]
    if sharded is not None:
        assert int(sharded[1]) < 0.6 * int(sharded[2])
    want, _ = read_metrics(tmp_path / "single")
    got, _ = read_metrics(tmp_path / "double")
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    final = "checkpoints/step_00000003/model.safetensors"
    w1, w2 = load_file(tmp_path / "single" / final), load_file(tmp_path / "double" / final)
    worst = max(float(((w2[k] - w1[k]).norm() / w1[k].norm()).item()) for k in w1)
    print(f"2 ranks at ZeRO-{zero_stage} vs 1: weights {worst:.3g} apart")
    assert worst < 1e-5


def test_the_distill_tiny_config_loads_a_smaller_student() -> None:
    """configs/distill-tiny.yaml (`make distill`) is a complete distill config whose student
    is smaller than the `make train` teacher it names."""
    from model.flops import param_counts
    from trainer.config import load_job_config
    from trainer.stages import get_stage

    get_stage("distill")
    student = load_job_config(ROOT / "configs" / "distill-tiny.yaml", stage="distill")
    teacher = load_job_config(ROOT / "configs" / "tiny.yaml")
    assert student.sections["distill"].teacher == teacher.run.dir
    assert student.tokenizer.path == f"{teacher.run.dir}/tokenizer"
    assert student.data.seq_len == teacher.data.seq_len
    for config in (student, teacher):
        config.model.vocab_size = 4096
    # 0.62M vs 1.84M parameters at vocab 4096 (embeddings dominate the student).
    assert param_counts(student.model).total < param_counts(teacher.model).total / 2.5
