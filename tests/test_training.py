"""End-to-end training on one process: loss falls, checkpoints verify, resume is bit-exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.golden import GOLDEN, fingerprint, run_golden
from tests.helpers import read_metrics, small_config
from trainer.checkpointing import checkpoint as ckpt
from trainer.inference import load_checkpoint_model

ROOT = Path(__file__).resolve().parents[1]


def train_in_subprocess(
    config: dict, tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", str(path), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def test_tiny_run_trains_evaluates_and_saves(tmp_path: Path, corpus: Path) -> None:
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.trainer import Trainer

    run_dir = tmp_path / "run"
    raw = small_config(
        run_dir,
        corpus,
        train={"max_steps": 24, "eval_every": 12},
        checkpoint={"every": 12, "keep": 1},
    )
    trainer = Trainer(job_config_from_dict(raw), detect_environment())
    trainer.setup()
    trainer.fit()

    train_lines, eval_lines = read_metrics(run_dir)
    assert [r["step"] for r in train_lines] == list(range(1, 25))
    assert set(train_lines[0]) >= {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "mfu",
        "mem_gb",
    }
    assert train_lines[-1]["tokens"] == 24 * 512 and train_lines[0]["mfu"] is None
    assert all(r["grad_norm"] > 0 for r in train_lines)
    assert [r["step"] for r in eval_lines] == [0, 12, 24]
    assert eval_lines[-1]["eval_loss"] < 0.75 * eval_lines[0]["eval_loss"]
    assert eval_lines[0]["split"] == "synthetic"
    assert sum(r["loss"] for r in train_lines[-4:]) < sum(r["loss"] for r in train_lines[:4])

    # keep=1 pruned step 12; `latest` names the final, complete checkpoint
    assert [p.name for p in ckpt.complete_checkpoints(run_dir / "checkpoints")] == ["step_00000024"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000024"
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tensorboard").iterdir())
    manifest = ckpt.verify_checkpoint(run_dir / "checkpoints" / "step_00000024")
    assert {"model.safetensors", "trainer_state.json", "tokenizer.model", "config.yaml"} <= set(
        manifest["files"]
    )

    # The consolidated weights reproduce the engine's eval loss
    from trainer.inference import evaluate_source

    loaded = load_checkpoint_model(run_dir)
    loss, _ = evaluate_source(
        loaded, str(corpus / "validation.jsonl"), "validation", max_sequences=2 * 8
    )
    assert loss == pytest.approx(eval_lines[-1]["eval_loss"], rel=1e-5)


def test_resume_after_a_crash_is_bit_exact(tmp_path: Path, corpus: Path) -> None:
    straight = small_config(tmp_path / "straight", corpus, train={"max_steps": 10, "eval_every": 0})
    result = train_in_subprocess(straight, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    crashed = small_config(
        tmp_path / "crashed",
        corpus,
        train={"max_steps": 10, "eval_every": 0},
        checkpoint={"every": 4},
    )
    result = train_in_subprocess(crashed, tmp_path, "--fail-at-step", "7")
    assert result.returncode == 17  # died after step 7; the newest checkpoint is step 4
    assert (tmp_path / "crashed/checkpoints/latest").read_text().strip() == "step_00000004"
    result = train_in_subprocess(crashed, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr

    expected, _ = read_metrics(tmp_path / "straight")
    resumed, _ = read_metrics(tmp_path / "crashed")
    assert [r["step"] for r in resumed] == list(
        range(1, 11)
    )  # lines of the lost steps 5-7 replaced
    for a, b in zip(expected, resumed, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], (
            a["step"]
        )
    state = json.loads(
        (tmp_path / "crashed/checkpoints/step_00000010/trainer_state.json").read_text()
    )
    assert state["step"] == 10 and state["tokens_seen"] == 10 * 512


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, corpus: Path) -> None:
    config = small_config(
        tmp_path / "run",
        corpus,
        train={"max_steps": 4, "eval_every": 0},
        checkpoint={"every": 2, "keep": 0},
    )
    assert train_in_subprocess(config, tmp_path).returncode == 0
    root = tmp_path / "run" / "checkpoints"
    weights = root / "step_00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: SHA-256 does not match"):
        ckpt.verify_checkpoint(root / "step_00000004")
    assert ckpt.find_resume_checkpoint(root) == root / "step_00000002"
    (root / ".tmp-step_00000006").mkdir()  # an interrupted save is invisible
    assert ckpt.find_resume_checkpoint(root) == root / "step_00000002"


def test_crafted_pickle_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    import pickle

    path = tmp_path / "rank_00000.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.safe_torch_load(path)


def test_generate_and_eval_commands(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = small_config(tmp_path / "run", corpus, train={"max_steps": 2, "eval_every": 0})
    assert train_in_subprocess(config, tmp_path).returncode == 0
    from launch.cli import main

    assert (
        main(["generate", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    )
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", str(tmp_path / "run"), "--data", str(corpus / "validation.jsonl")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval_loss"] > 0 and report["tokens"] > 0
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_golden_loss_curve(tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    expected = golden["losses"]
    losses = run_golden(tmp_path)
    assert len(losses) == len(expected) == 20
    message = "numerics changed; if intended, run `make golden` and say why in the commit"
    if golden.get("fingerprint") == fingerprint():
        assert losses == expected, message
    else:  # other CPU kernels or torch build: see tests/golden.py for what is guaranteed
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0, msg=message)


def test_document_masking_run_and_metrics_by_source(tmp_path: Path, corpus: Path) -> None:
    config = small_config(
        tmp_path / "run",
        corpus,
        train={"max_steps": 4, "eval_every": 2},
        data={"document_masking": True},
    )
    config["model"]["reset_positions_per_document"] = True
    result = train_in_subprocess(config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    train_lines, eval_lines = read_metrics(tmp_path / "run")
    assert train_lines[-1]["tokens_by_source"]["synthetic"] >= 4 * 512
    assert train_lines[-1]["skipped_by_reason"] == {}
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert eval_lines[-1]["eval_loss"] < eval_lines[0]["eval_loss"]
