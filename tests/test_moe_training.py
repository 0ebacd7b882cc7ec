"""tiny-moe end to end: `scaletrain train` runs it, the loss falls, expert load is logged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_MOE_MODEL as MOE_MODEL
from tests.helpers import read_metrics, small_config
from tests.test_training import ROOT, train_in_subprocess


def test_tiny_moe_trains_through_the_cli_and_logs_expert_load(tmp_path: Path, corpus: Path) -> None:
    config = small_config(
        tmp_path / "run",
        corpus,
        model={**MOE_MODEL, "first_dense_layers": 1, "capacity_factor": 1.0},
        train={"max_steps": 16, "eval_every": 0},
    )
    result = train_in_subprocess(config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines, _ = read_metrics(tmp_path / "run")
    assert [r["step"] for r in lines] == list(range(1, 17))
    assert sum(r["loss"] for r in lines[-4:]) < 0.8 * sum(r["loss"] for r in lines[:4])
    first = lines[0]
    # aux = 0.01 * balance loss (~1) + 0.001 * z-loss: reported apart from the LM loss
    assert 0.005 < first["aux_loss"] < 0.1
    assert first["moe_imbalance_max"] >= 1.0 and first["moe_layer1_imbalance"] >= 1.0
    assert "moe_layer0_imbalance" not in first  # layer 0 is dense
    load = first["moe_tokens_per_expert"]["layer1"]  # one micro-batch of 512 tokens, top-2
    assert len(load) == 4 and sum(load) == 512 * 2
    assert all(r["moe_dropped_tokens"] >= 0 for r in lines)


def moe_losses_at(zero_stage: int, tmp_path: Path, corpus: Path) -> list[float]:
    config = small_config(
        tmp_path / f"zero{zero_stage}",
        corpus,
        model=MOE_MODEL,
        train={"max_steps": 3, "eval_every": 0},
        parallel={"zero_stage": zero_stage, "precision": "fp32"},
    )
    result = train_in_subprocess(config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines, _ = read_metrics(tmp_path / f"zero{zero_stage}")
    assert len(lines) == 3 and all(r["aux_loss"] > 0 for r in lines)
    return [r["loss"] for r in lines]


@pytest.fixture(scope="module")
def zero_0_losses(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> list[float]:
    return moe_losses_at(0, tmp_path_factory.mktemp("moe-zero0"), corpus)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_tiny_moe_under_zero_matches_zero_0(
    tmp_path: Path, corpus: Path, zero_stage: int, zero_0_losses: list[float]
) -> None:
    losses = moe_losses_at(zero_stage, tmp_path, corpus)
    assert losses == pytest.approx(zero_0_losses, rel=1e-5)


def test_tiny_moe_config_file_resolves() -> None:
    from trainer.config import job_config_from_dict

    raw = yaml.safe_load((ROOT / "configs" / "tiny-moe.yaml").read_text())
    model = job_config_from_dict(raw).model
    assert (model.n_experts, model.top_k) == (8, 2)


def test_trained_moe_checkpoint_exports_and_reimports(tmp_path: Path, corpus: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    from launch.cli import main
    from trainer.inference import load_checkpoint_model

    run_dir = tmp_path / "run"
    config = small_config(
        run_dir,
        corpus,
        model=MOE_MODEL,
        train={"max_steps": 2, "eval_every": 0},
        checkpoint={"every": 2},
    )
    assert train_in_subprocess(config, tmp_path).returncode == 0
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    loaded = load_checkpoint_model(run_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    batch = torch.tensor([loaded.tokenizer.encode("def compute_value(items):\n    return 1\n")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(batch).logits, loaded.model(batch), atol=1e-5, rtol=1e-5)
    imported = tmp_path / "imported"
    assert main(["import", str(out), "--out", str(imported)]) == 0
    again = load_checkpoint_model(imported)
    assert again.model.config.n_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(again.model(batch), loaded.model(batch), atol=1e-6, rtol=1e-6)
