"""ZeRO-1/2/3 checkpoints resume on another world size (or ZeRO stage) with their optimizer state.

An uninterrupted 8-step run on N ranks saves at step 4 and gives the reference losses. Its step-4
checkpoint is copied into a fresh run directory and resumed on M ranks: steps 5-8 must equal the
reference within 1e-5 relative (the global batch is the same on any world size; only the order of
the gradient reduction differs). Without the optimizer state (Adam moments, step count) or the
scheduler the continuation would differ at the first step after resume.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import TINY_MOE_MODEL as MOE_MODEL
from tests.test_resilience import config_file, run, step_lines, train_cmd
from trainer.checkpointing import checkpoint as ckpt
from trainer.checkpointing import reshard

STEPS, SAVED_AT = 8, 4
# Routers with an aux-free bias: a buffer (not a parameter) that must survive the conversion too.
# Each rank updates it from its own micro-batches, so runs agree only at the same world size.
MOE_WITH_BIAS = {**MOE_MODEL, "aux_free_bias_update_rate": 0.01}
MODELS: dict[str, dict | None] = {"dense": None, "moe": MOE_MODEL, "moe_bias": MOE_WITH_BIAS}

Reference = Callable[..., Path]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Reference:
    """reference(nproc, stage, model="dense"): the run dir of an uninterrupted run (cached)."""
    runs: dict[tuple[int, int, str], Path] = {}
    root = tmp_path_factory.mktemp("reference")

    def get(nproc: int, stage: int, model: str = "dense") -> Path:
        key = (nproc, stage, model)
        if key not in runs:
            name = f"ref_{model}_{nproc}rank_zero{stage}"
            config = config_file(root, corpus, name, **sections(stage, MODELS[model]))
            run(train_cmd(config, nproc))
            runs[key] = root / name
        return runs[key]

    return get


def sections(stage: int, model: dict | None) -> dict[str, dict]:
    extra = {"model": model} if model else {}
    return {
        "train": {"max_steps": STEPS},
        "parallel": {"zero_stage": stage},
        "checkpoint": {"every": SAVED_AT},
        **extra,
    }


def fork_at_checkpoint(source: Path, target: Path) -> Path:
    """A run directory that stopped at SAVED_AT: the checkpoint, tokenizer and metrics so far."""
    name = ckpt.step_dir_name(SAVED_AT)
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    (target / "checkpoints" / ckpt.LATEST).write_text(name + "\n")
    shutil.copytree(source / "tokenizer", target / "tokenizer")
    shutil.copy(source / "metrics.jsonl", target / "metrics.jsonl")  # truncated at resume
    return target / "checkpoints" / name


def resume_elsewhere(
    tmp_path: Path,
    corpus: Path,
    source: Path,
    nproc: int,
    stage: int,
    model: str = "dense",
) -> tuple[list[float], str]:
    """Resume `source`'s step-4 checkpoint on `nproc` ranks at ZeRO-`stage`; (losses, log)."""
    name = f"resumed_{nproc}rank_zero{stage}"
    saved = fork_at_checkpoint(source, tmp_path / name)
    manifest_before = (saved / ckpt.MANIFEST).read_bytes()
    config = config_file(tmp_path, corpus, name, **sections(stage, MODELS[model]))
    result = run(train_cmd(config, nproc))
    assert f"resumed from {saved}" in result.stderr
    assert "converting its optimizer state" in result.stderr
    # The published checkpoint was only read; the converted copy lives apart, once.
    assert (saved / ckpt.MANIFEST).read_bytes() == manifest_before
    ckpt.verify_checkpoint(saved)
    converted = [p.name for p in (tmp_path / name / reshard.RESHARD_DIR).iterdir()]
    assert len(converted) == 1 and converted[0].startswith(f"{saved.name}-")
    lines = step_lines(tmp_path / name)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    return [r["loss"] for r in lines], result.stderr


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in step_lines(run_dir)]


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_zero_checkpoint_resumes_on_another_world_size(
    first: int, second: int, stage: int, reference: Reference, tmp_path: Path, corpus: Path
) -> None:
    source = reference(first, stage)
    resumed, _ = resume_elsewhere(tmp_path, corpus, source, second, stage)
    expected = losses(source)
    assert resumed[SAVED_AT:] == pytest.approx(expected[SAVED_AT:], rel=1e-5)
    # The continuation moved on from the checkpoint (not a run restarted from scratch).
    assert resumed[SAVED_AT] != pytest.approx(expected[0], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_checkpoint_resumes_from_two_ranks_on_four(
    stage: int, reference: Reference, tmp_path: Path, corpus: Path
) -> None:
    source = reference(2, stage)
    resumed, _ = resume_elsewhere(tmp_path, corpus, source, 4, stage)
    assert resumed[SAVED_AT:] == pytest.approx(losses(source)[SAVED_AT:], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("first", "second", "stage"), [(2, 1, 1), (1, 2, 3)])
def test_moe_checkpoint_resumes_on_another_world_size(
    first: int, second: int, stage: int, reference: Reference, tmp_path: Path, corpus: Path
) -> None:
    source = reference(first, stage, "moe")
    resumed, _ = resume_elsewhere(tmp_path, corpus, source, second, stage, "moe")
    assert resumed[SAVED_AT:] == pytest.approx(losses(source)[SAVED_AT:], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "first", "first_stage", "second", "second_stage"),
    [("dense", 2, 1, 1, 3), ("dense", 1, 3, 2, 2), ("moe_bias", 2, 1, 2, 3)],
)
def test_zero_stage_changes_on_resume(
    model: str,
    first: int,
    first_stage: int,
    second: int,
    second_stage: int,
    reference: Reference,
    tmp_path: Path,
    corpus: Path,
) -> None:
    source = reference(first, first_stage, model)
    resumed, _ = resume_elsewhere(tmp_path, corpus, source, second, second_stage, model)
    assert resumed[SAVED_AT:] == pytest.approx(losses(source)[SAVED_AT:], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "first_stage", "second", "second_stage"), [(2, 0, 1, 3), (2, 1, 1, 0), (1, 3, 2, 0)]
)
def test_zero0_converts_to_and_from_partitioned(
    first: int,
    first_stage: int,
    second: int,
    second_stage: int,
    reference: Reference,
    tmp_path: Path,
    corpus: Path,
) -> None:
    source = reference(first, first_stage)
    resumed, _ = resume_elsewhere(tmp_path, corpus, source, second, second_stage)
    assert resumed[SAVED_AT:] == pytest.approx(losses(source)[SAVED_AT:], rel=1e-5)


def test_zero0_conversion_outside_fp32_is_refused_with_one_line(
    reference: Reference, tmp_path: Path, corpus: Path
) -> None:
    fork_at_checkpoint(reference(2, 1), tmp_path / "to_zero0")
    config = config_file(tmp_path, corpus, "to_zero0", **sections(0, None))
    result = run(train_cmd(config, 1, "--set", "parallel.precision=bf16"), expect=2)
    last = result.stderr.strip().splitlines()[-1]
    assert "written by 2 ranks at ZeRO-1, resuming on 1 ranks at ZeRO-0" in last
    assert "only in fp32, not bf16" in last
    assert "Traceback" not in result.stderr


def test_damaged_or_partial_conversions_are_never_used(
    reference: Reference, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The conversion itself runs in-process on a real 2-rank ZeRO-1 checkpoint."""
    saved = fork_at_checkpoint(reference(2, 1), tmp_path / "run")
    run_dir = tmp_path / "run"
    layout = reshard.ResumeLayout(2, 1, "fp32", 1, 1, "fp32")
    no_model = reshard.ModelLayout([], {})  # used only by conversions from or to ZeRO-0

    def convert() -> Path:
        return reshard.converted_checkpoint(saved, run_dir, layout, no_model)

    cache = run_dir / reshard.RESHARD_DIR
    # Leftovers of a conversion killed midway, and of an older checkpoint's conversion.
    partial = cache / f"{ckpt.TMP_PREFIX}{reshard.cache_name(saved, layout)}" / "deepspeed"
    partial.mkdir(parents=True)
    (cache / "step_00000002-0123456789abcdef-universal").mkdir()

    converted = convert()
    assert [p.name for p in cache.iterdir()] == [converted.name]
    ckpt.verify_checkpoint(converted)
    fp32 = next(converted.rglob("zero/*/fp32.pt"))
    good = fp32.read_bytes()

    fp32.write_bytes(good[:-8])  # damaged after the fact: detected and converted again
    with caplog.at_level("WARNING"):
        again = convert()
    assert again == converted and "converting again" in caplog.text
    assert fp32.read_bytes() == good
    ckpt.verify_checkpoint(again)

    (converted / ckpt.MANIFEST).unlink()  # no manifest: incomplete, never used as it is
    convert()
    ckpt.verify_checkpoint(converted)

    # A changed checkpoint has another manifest, hence another cache entry.
    other = fork_at_checkpoint(reference(2, 1), tmp_path / "other")
    (other / ckpt.MANIFEST).write_text((other / ckpt.MANIFEST).read_text() + " ")
    assert reshard.cache_name(other, layout) != reshard.cache_name(saved, layout)
