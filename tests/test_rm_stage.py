"""`scaletrain rm` end to end: a crash-and-resume run equal to a straight one, and the
exported `...ForSequenceClassification` scoring like `scaletrain score`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import read_metrics
from tests.pref_helpers import base_run, cli, preference_config, write_pairs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    """A straight 4-step rm run (checkpoints at 2 and 4) and the inputs to repeat it."""
    folder = tmp_path_factory.mktemp("rm")
    base = base_run(folder / "base", corpus)
    train = write_pairs(folder / "train.jsonl", 64, 0)
    validation = write_pairs(folder / "validation.jsonl", 16, 1)
    raw = preference_config(folder / "straight", base, train, validation, train={"max_steps": 4})
    raw["checkpoint"]["every"] = 2
    result = cli("rm", raw, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder / "raw.json").write_text(json.dumps(raw))
    return {"folder": folder, "run": folder / "straight", "validation": validation}


def test_rm_resumes_bit_exactly_after_a_crash(rm_run: dict[str, Path], tmp_path: Path) -> None:
    crashed = json.loads((rm_run["folder"] / "raw.json").read_text())
    crashed["run"]["dir"] = str(tmp_path / "crashed")
    assert cli("rm", crashed, tmp_path, "--fail-at-step", "3").returncode == 17
    result = cli("rm", crashed, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a = read_metrics(rm_run["run"])[0]
    b = {line["step"]: line for line in read_metrics(tmp_path / "crashed")[0]}
    assert [line["loss"] for line in a] == [b[s]["loss"] for s in (1, 2, 3, 4)]
    assert a[0]["loss"] != a[-1]["loss"]  # it trained


def test_exported_reward_model_scores_like_scaletrain_score(
    rm_run: dict[str, Path], tmp_path: Path
) -> None:
    from launch.score_cli import record_text
    from trainer.hf_reward import load_reward_checkpoint

    out = tmp_path / "hf"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "launch.cli", *args],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=300,
        )

    exported = run("export", str(rm_run["run"]), "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-3000:]
    records = tmp_path / "records.jsonl"
    lines = [json.loads(x) for x in rm_run["validation"].read_text().splitlines()[:6]]
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in lines]
    rows.append({"messages": [{"role": "user", "content": "hi"}]})
    rows.append({"nothing": 1})  # cannot be scored: an error line keeps the order
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores_path = tmp_path / "scores.jsonl"
    scored = run("score", str(rm_run["run"]), "--data", str(records), "--out", str(scores_path))
    assert scored.returncode == 0, scored.stderr[-3000:]
    scores = [json.loads(x) for x in scores_path.read_text().splitlines()]
    assert len(scores) == len(rows) and scores[-1]["score"] is None and scores[-1]["error"]

    loaded = load_reward_checkpoint(rm_run["run"])
    from data_pipeline.chat import ChatTemplate, checkpoint_template

    template = ChatTemplate(checkpoint_template(loaded.folder) or "", loaded.tokenizer)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_scores = []
    for row in rows[:-1]:
        ids = loaded.tokenizer.encode(record_text(row, template))
        with torch.no_grad():
            hf_scores.append(float(model(torch.tensor([ids])).logits[0, 0]))
    ours = [s["score"] for s in scores[:-1]]
    assert max(abs(a - b) for a, b in zip(ours, hf_scores, strict=True)) < 1e-5
    assert max(ours) - min(ours) > 1e-4  # negative control: the scores depend on the text
