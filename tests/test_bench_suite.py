"""`python -m bench.suite --smoke` runs every row of the GPU suite on CPU, so it cannot rot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import suite


def test_smoke_suite_runs_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert suite.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    (report_file,) = tmp_path.glob("*-cpu-smoke.json")
    report = json.loads(report_file.read_text())
    rows = {row["row"]: row for row in report["rows"]}
    expected = {
        "train-seq64-eager",
        "transformers-seq64",
        "train-seq64-compile",
        "train-seq64-selective_ops",
        "train-seq128-eager",
        "moe-seq64-eager",
    }
    assert expected <= rows.keys()
    assert any(name.startswith("attention") for name in rows)
    measured = expected - {"train-seq64-selective_ops"}
    if suite.config_accepts("activation_checkpointing", "selective_ops"):
        measured.add("train-seq64-selective_ops")
    else:
        assert "trainer/config.py" in rows["train-seq64-selective_ops"]["reason"]
    for name in measured:
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and math.isfinite(row["final_loss"]), row
        assert row["steps_measured"] == suite.SMOKE.steps, row
    # The dense rows train the same model on the same data: the same first-epoch losses.
    assert rows["train-seq64-compile"]["final_loss"] == rows["train-seq64-eager"]["final_loss"]
    assert rows["transformers-seq64"]["ratio_ours_over_theirs"] > 0
    for row in rows.values():
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"], row
    table = report_file.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in rows)
    assert "| train-seq64-eager | ok |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_suite_without_cuda_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert suite.main(["--out-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "bench.suite: skipped every row: no CUDA device (run with --smoke for the CPU check of "
        "the suite itself)"
    ]
    assert not list(tmp_path.iterdir())


def test_missing_package_without_wheels_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(suite, "NEEDED_MODULES", ("no_such_module_for_the_suite",))
    with pytest.raises(
        SystemExit, match="missing no_such_module_for_the_suite and no wheel folder"
    ):
        suite.install_missing_packages(tmp_path / "absent")
