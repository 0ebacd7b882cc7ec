"""Config loading: typed sections, presets, overrides and one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from trainer.config import JobConfig, load_job_config, write_config
from trainer.config_io import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_presets_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, {"model": {"preset": "tiny", "n_layers": 3}, "train": {"lr": 1e-3}})
    config = load_job_config(path, ["train.lr=5e-4", "data.train.0.weight=2", "run.seed=9"])
    assert config.model.dim == 128 and config.model.n_layers == 3 and config.model.preset == "tiny"
    assert config.train.lr == pytest.approx(5e-4)
    assert config.data.train[0].weight == 2.0
    assert config.run.seed == 9


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_job_config(ROOT / "configs" / "tiny.yaml")
    write_config(config, tmp_path / "resolved.yaml")
    again = load_job_config(tmp_path / "resolved.yaml")
    assert isinstance(again, JobConfig)
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("data", "overrides", "expected"),
    [
        ({"train": {"lrr": 1.0}}, [], "train.lrr: unknown key"),
        (
            {"train": {"max_steps": "many"}},
            [],
            "train.max_steps: expected an integer, got str 'many'",
        ),
        ({"parallel": {"zero_stage": 5}}, [], "parallel.zero_stage: must be 0, 1, 2 or 3"),
        ({"parallel": {"precision": "fp8"}}, [], "parallel.precision: must be one of"),
        (
            {"parallel": {"expert_parallel": 0}},
            [],
            "parallel.expert_parallel: must be >= 1, got 0",
        ),
        ({"model": {"preset": "giant"}}, [], "model.preset: unknown preset 'giant'"),
        ({"model": {"dim": 100, "n_heads": 3}}, [], "model.dim: 100 is not divisible by n_heads=3"),
        ({"data": {"train": [{"weight": 1.0}]}}, [], "data.train.0.path: required key is missing"),
        ({}, ["train.lr=fast"], "train.lr: expected a number, got str 'fast'"),
        ({}, ["nokey"], "expected KEY=VALUE"),
        (
            {"data": {"seq_len": 300}, "train": {"global_batch_tokens": 1000}},
            [],
            "train.global_batch_tokens",
        ),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, data: dict, overrides: list[str], expected: str
) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_job_config(path, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    # It names the config file, or the malformed --set argument itself.
    assert str(path) in message or any(f"--set {o!r}" in message for o in overrides)


def test_cli_config_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"scaletrain: error: {tmp_path / 'missing.yaml'}: config file not found"

    bad_type = write(tmp_path, {"train": {"max_steps": [1, 2]}})
    assert main(["train", str(bad_type), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.max_steps: expected an integer" in err

    (tmp_path / "broken.yaml").write_text("train: {max_steps: 3\n")
    assert main(["train", str(tmp_path / "broken.yaml")]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    path = write(tmp_path, {"checkpoint": {"kep": 1}})
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("checkpoint.kep: unknown key (did you mean keep?)")
    )


def test_dry_run_reports_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "train",
                str(ROOT / "configs" / "tiny.yaml"),
                "--dry-run",
                "--set",
                "model.vocab_size=4096",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "parameters: total 1,836,160" in out
    assert "flops_per_token:" in out and "token_budget:" in out and "zero-3:" in out
    assert '"train_micro_batch_size_per_gpu"' in out
