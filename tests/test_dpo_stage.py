"""`scaletrain dpo` end to end: ln 2 on the first line, the reference cache equal to a live
reference (and refused when its key changes), LoRA's adapters-off reference, bit-exact resume,
and a short run that learns a preference set."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from model import build_model
from model.config import ModelConfig
from model.lora import LoRAConfig, adapters_disabled, apply_lora
from tests.helpers import read_metrics
from tests.pref_helpers import base_run, cli, preference_config, run_stage, write_pairs
from trainer.checkpointing.checkpoint import CheckpointError
from trainer.reference_cache import CACHE_FILE


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dpo")
    return {
        "base": base_run(folder / "base", corpus),
        "train": write_pairs(folder / "train.jsonl", 64, 0),
        "other_train": write_pairs(folder / "other.jsonl", 64, 5),
        "validation": write_pairs(folder / "validation.jsonl", 16, 1),
    }


def config(data: dict[str, Path], run_dir: Path, **sections: Any) -> dict[str, Any]:
    return preference_config(run_dir, data["base"], data["train"], data["validation"], **sections)


def test_first_line_is_ln2_through_the_cli_and_not_against_another_reference(
    data: dict[str, Path], tmp_path: Path
) -> None:
    raw = config(data, tmp_path / "run", train={"max_steps": 1, "eval_every": 1})
    raw["sft"] = {**raw.get("sft", {}), "sample_chat": "Name a colour.", "sample_tokens": 6}
    result = cli("dpo", raw, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # The end-of-run chat turn: rendered with the run's template, stopped at the end of turn.
    assert "--- chat sample (step_00000001, greedy) ---\nuser: Name a colour.\nassistant: " in (
        result.stdout
    ), result.stdout[-2000:]
    lines, evals = read_metrics(tmp_path / "run")
    first = lines[0]
    assert abs(first["dpo_loss"] - math.log(2)) < 1e-6
    for name in ("chosen_reward", "rejected_reward", "reward_margin"):
        assert first[name] == 0.0
    assert first["logps_chosen"] < 0 and first["logps_rejected"] < 0
    assert evals[0]["kl_to_reference"] == 0.0 and evals[-1]["kl_to_reference"] > 0
    # Negative control: against the base run's earlier checkpoint the policy differs from
    # the reference, so the first loss is not ln 2.
    earlier = str(data["base"] / "checkpoints" / "step_00000001")
    other = config(data, tmp_path / "other", train={"max_steps": 1}, dpo={"reference": earlier})
    lines = read_metrics(run_stage(other, "dpo"))[0]
    assert abs(lines[0]["dpo_loss"] - math.log(2)) > 1e-4


def test_cached_reference_equals_live_resumes_exactly_and_refuses_other_keys(
    data: dict[str, Path], tmp_path: Path
) -> None:
    constant = {"schedule": "constant"}  # a shorter first leg keeps the same learning rates
    live = read_metrics(run_stage(config(data, tmp_path / "live", train=constant), "dpo"))[0]
    cached_raw = config(
        data, tmp_path / "cached", dpo={"precompute_reference": True}, train=constant
    )
    cached = read_metrics(run_stage(cached_raw, "dpo"))[0]
    assert [line["step"] for line in cached] == [1, 2, 3]
    for a, b in zip(live, cached, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["loss"], b["loss"])
        assert abs(a["chosen_reward"] - b["chosen_reward"]) < 1e-6
    cache = tmp_path / "cached" / "reference_cache" / CACHE_FILE
    written = cache.stat().st_mtime_ns

    # Resume from step 2 with the cache: steps 3 on equal the straight run's bit for bit.
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "cached" / "reference_cache", split / "reference_cache")
    first = config(
        data, split, dpo={"precompute_reference": True}, train={**constant, "max_steps": 2}
    )
    first["checkpoint"]["every"] = 2
    run_stage(first, "dpo")
    resumed = copy.deepcopy(first)
    resumed["train"]["max_steps"] = 3
    lines = read_metrics(run_stage(resumed, "dpo"))[0]
    assert [line["loss"] for line in lines] == [line["loss"] for line in cached]
    assert cache.stat().st_mtime_ns == written  # the copied cache was reused, not rewritten

    # Another dataset or another reference against the same cache: one line naming the field.
    other_data = copy.deepcopy(cached_raw)
    other_data["data"]["train"][0]["path"] = str(data["other_train"])
    with pytest.raises(CheckpointError, match="different data_fingerprint"):
        run_stage(other_data, "dpo")
    other_reference = copy.deepcopy(cached_raw)
    other_reference["dpo"]["reference"] = str(data["base"] / "checkpoints" / "step_00000001")
    with pytest.raises(CheckpointError, match="different reference_sha256"):
        run_stage(other_reference, "dpo")


def test_resuming_against_another_reference_is_refused(
    data: dict[str, Path], tmp_path: Path
) -> None:
    raw = config(data, tmp_path / "run", train={"max_steps": 1})
    run_stage(raw, "dpo")
    raw["train"]["max_steps"] = 2
    raw["dpo"] = {"reference": str(data["base"] / "checkpoints" / "step_00000001")}
    with pytest.raises(CheckpointError, match=r"dpo\.reference: the checkpoint was trained"):
        run_stage(raw, "dpo")


def test_adapters_off_equal_the_base_model_exactly() -> None:
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97)
    base = build_model(config, "cpu", seed=3)
    policy = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()  # trained adapters: they change the output
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected = base(tokens)
        with adapters_disabled(policy):
            off = policy(tokens)
        on = policy(tokens)
    assert torch.equal(off, expected)
    assert (on - expected).abs().max() > 1e-3  # negative control: the adapters do act
    assert all(m.scaling == 4.0 for n, m in policy.named_modules() if n.endswith("q_proj"))


def test_lora_dpo_adapters_off_reference_equals_a_full_copy(
    data: dict[str, Path], tmp_path: Path
) -> None:
    lora = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}
    off = config(data, tmp_path / "off", lora=lora, train={"max_steps": 2})
    # An explicit reference is a separate frozen copy of the same starting weights.
    full = config(
        data,
        tmp_path / "full",
        lora=lora,
        train={"max_steps": 2},
        dpo={"reference": str(data["base"])},
    )
    a, b = read_metrics(run_stage(off, "dpo"))[0], read_metrics(run_stage(full, "dpo"))[0]
    assert abs(a[0]["dpo_loss"] - math.log(2)) < 1e-6
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-6
        assert abs(x["reward_margin"] - y["reward_margin"]) < 1e-6
    assert a[1]["reward_margin"] != 0.0  # the adapters trained: step 2 is not trivially equal


def test_dpo_resumes_bit_exactly_after_a_crash(data: dict[str, Path], tmp_path: Path) -> None:
    straight = config(data, tmp_path / "straight", train={"max_steps": 4})
    straight["checkpoint"]["every"] = 2
    assert cli("dpo", straight, tmp_path).returncode == 0
    crashed = copy.deepcopy(straight)
    crashed["run"]["dir"] = str(tmp_path / "crashed")
    assert cli("dpo", crashed, tmp_path, "--fail-at-step", "3").returncode == 17
    result = cli("dpo", crashed, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a = read_metrics(tmp_path / "straight")[0]
    b = {line["step"]: line for line in read_metrics(tmp_path / "crashed")[0]}
    assert [line["loss"] for line in a] == [b[s]["loss"] for s in (1, 2, 3, 4)]


def test_dpo_raises_heldout_reward_accuracy_and_margin(
    data: dict[str, Path], tmp_path: Path
) -> None:
    raw = config(
        data,
        tmp_path / "run",
        train={"max_steps": 16, "eval_every": 16, "lr": 5e-3, "eval_batches": 4},
    )
    evals = read_metrics(run_stage(raw, "dpo"))[1]
    before, after = evals[0], evals[-1]
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == 0.0
    assert after["reward_accuracy"] >= 0.75, after
    assert after["reward_margin"] > 0.1, after
    assert after["eval_loss"] < math.log(2) - 0.05


@pytest.mark.slow
def test_one_rank_and_two_ranks_at_zero3_give_equal_losses(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """With the reference sharded over the two ranks (trainer/frozen.py), live and through
    the precompute pre-pass (tests/test_sharded_reference.py checks the shards themselves)."""
    import os
    import re
    import subprocess
    import sys

    import yaml

    raw = config(data, tmp_path / "one", train={"max_steps": 3, "micro_batch_size": 2})
    raw["parallel"]["zero_stage"] = 3
    assert cli("dpo", raw, tmp_path).returncode == 0

    def two_ranks(name: str, **dpo: Any) -> str:
        two = copy.deepcopy(raw)
        two["run"]["dir"] = str(tmp_path / name)
        two["dpo"] = {**two.get("dpo", {}), **dpo}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(two))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        torchrun = Path(sys.executable).parent / "torchrun"
        command = [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "launch.cli"]
        result = subprocess.run(
            [*command, "dpo", str(path)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    logged = two_ranks("two")
    sharded = re.search(r"reference sharded over 2 ranks \(ZeRO-3\): (\d+) of its (\d+)", logged)
    assert sharded is not None, logged[-3000:]
    assert int(sharded[1]) < 0.6 * int(sharded[2])
    one_lines = read_metrics(tmp_path / "one")[0]
    two_lines = read_metrics(tmp_path / "two")[0]
    assert len(one_lines) == len(two_lines) == 3
    for a, b in zip(one_lines, two_lines, strict=True):
        assert abs(a["dpo_loss"] - b["dpo_loss"]) < 1e-5, (a["dpo_loss"], b["dpo_loss"])
        assert a["tokens"] == b["tokens"]
    assert one_lines[0]["dpo_loss"] != one_lines[-1]["dpo_loss"]  # it trained

    # The pre-pass over the sharded reference: its micro-batches shared out over the ranks.
    two_ranks("cached", precompute_reference=True)
    assert (tmp_path / "cached" / "reference_cache" / CACHE_FILE).is_file()
    cached_lines = read_metrics(tmp_path / "cached")[0]
    for a, b in zip(two_lines, cached_lines, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["loss"], b["loss"])
        assert abs(a["chosen_reward"] - b["chosen_reward"]) < 1e-6
