"""A new user's first hour: a quiet, fast command line; a dry-run that catches what `train`
would fail on; messages that say what to do; slurm scripts, export file modes, real configs."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch.cli import main
from trainer.config_io import ConfigError, nearest_global_batches, split_global_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`scaletrain ARGS` in a fresh process, as a user runs it (no DS_ACCELERATOR preset)."""
    clean = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=300,
    )


def modules_after(code: str) -> dict[str, bool]:
    """Run `code` (calls of main) in a fresh process; which heavy libraries got imported."""
    probe = (
        "import json, sys\nfrom launch.cli import main\n"
        + code
        + "\nprint(json.dumps({m: m in sys.modules for m in ('torch', 'deepspeed')}),"
        " file=sys.stderr)"
    )
    clean = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    return dict(json.loads(result.stderr.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------- fast imports
def test_help_imports_neither_deepspeed_nor_torch() -> None:
    code = "\n".join(
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass"
        for argv in (["--help"], ["train", "--help"], ["plan", "--help"], ["export", "--help"])
    )
    assert modules_after(code) == {"torch": False, "deepspeed": False}
    # Negative control: the probe does see an import.
    assert modules_after("import trainer.distributed") == {"torch": True, "deepspeed": True}


def test_dry_run_plan_and_tokenizer_do_not_import_deepspeed(corpus: Path, tmp_path: Path) -> None:
    code = (
        f"assert main(['train', {TINY!r}, '--dry-run']) == 0\n"
        "assert main(['plan', '--flops', '1e20', '--json']) == 0\n"
        f"assert main(['tokenizer', 'train', '--input', {str(corpus / 'train.jsonl')!r},"
        f" '--vocab-size', '320', '--out', {str(tmp_path / 'tok')!r}]) == 0"
    )
    assert modules_after(code)["deepspeed"] is False


def test_help_lists_agree_with_the_registries() -> None:
    from launch.hf_cli import HF_FAMILIES
    from launch.plan_cli import GPU_NAMES
    from model.hf import FAMILIES
    from trainer.planning.hardware import PEAK_BF16_FLOPS

    assert tuple(FAMILIES) == HF_FAMILIES
    assert tuple(PEAK_BF16_FLOPS) == GPU_NAMES
    from launch.merge_cli import METHODS as CLI_METHODS
    from trainer.merging import METHODS

    assert CLI_METHODS == METHODS


# ---------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--set", "train.max_stepz=3"],
            "--set train.max_stepz=3: unknown key (did you mean max_steps?)",
        ),
        (
            ["--set", "data.train.0.path=/nonexistent/shards/*.jsonl"],
            "data.train.0.path: /nonexistent/shards/*.jsonl: matched no data files",
        ),
        (
            ["--world-size", "8"],
            "--world-size: only plans a --dry-run; a run's world size comes from its launcher",
        ),
        (
            ["--dry-run", "--set", "tokenizer.path=/nonexistent/tok.model"],
            "tokenizer.path: /nonexistent/tok.model: no such file or folder",
        ),
    ],
)
def test_config_mistakes_print_one_line_and_nothing_on_stdout(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", TINY, "--set", f"run.dir={run_dir}", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"scaletrain: error: {expected}")
    assert not run_dir.exists()  # nothing half-made


def test_missing_data_fails_the_dry_run_without_creating_the_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    missing = tmp_path / "data" / "train.jsonl"
    base = ["train", TINY, "--dry-run", "--set", f"run.dir={run_dir}"]
    assert main([*base, "--set", f"data.validation.0.path={missing}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        f"scaletrain: error: data.validation.0.path: {missing}: no such file, folder or glob match"
    )
    assert not run_dir.exists()
    # Control: once the file exists the same dry-run passes (and still writes nothing).
    missing.parent.mkdir()
    missing.write_text(json.dumps({"text": "def f(): pass"}) + "\n")
    assert main([*base, "--set", f"data.validation.0.path={missing}"]) == 0
    assert not run_dir.exists()


def test_preflight_checks_init_from_and_run_dir(tmp_path: Path) -> None:
    from launch.preflight import check_init_from, check_writable_dir

    with pytest.raises(ConfigError, match=r"^model.init_from: hf:.*: no config.json in"):
        check_init_from(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text("{}")
    check_init_from(f"hf:{tmp_path}")
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="no such folder"):
        check_init_from(str(run))
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no checkpoint there \(looked for .*model.safetensors"):
        check_init_from(str(run))  # an unpublished step folder (no manifest) does not count
    (step / "manifest.json").write_text("{}")
    check_init_from(str(run))  # a run dir with a complete checkpoint
    check_init_from(str(step))

    check_writable_dir(str(tmp_path / "new" / "deeper"), "run.dir")
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(
        ConfigError, match=r"^run.dir: .*afile/run: .*afile is a file, not a folder"
    ):
        check_writable_dir(str(tmp_path / "afile" / "run"), "run.dir")


def test_unknown_keys_suggest_the_closest(tmp_path: Path) -> None:
    from trainer.config import load_job_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_step": 3}, "checkpoint": {"every": 5}}))
    with pytest.raises(ConfigError) as info:
        load_job_config(path)
    assert str(info.value) == f"{path}: train.max_step: unknown key (did you mean max_steps?)"
    path.write_text(yaml.safe_dump({"checkpoint": {"zzz": 1}}))
    with pytest.raises(ConfigError) as info:
        load_job_config(path)  # nothing close: the known keys
    assert str(info.value).endswith(
        "checkpoint.zzz: unknown key (known: every, keep, resume, async_save, async_timeout_s)"
    )


def test_set_errors_name_the_set_not_the_file(tmp_path: Path) -> None:
    from launch.preflight import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 3}}))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["train.lr=fast"])
    assert str(info.value) == "--set train.lr=fast: expected a number, got str 'fast'"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["data.train.0.weight=-1"])
    assert str(info.value) == "--set data.train.0.weight=-1: must be > 0, got -1.0"
    path.write_text(yaml.safe_dump({"train": {"max_steps": "many"}}))
    with pytest.raises(ConfigError) as info:  # the file's own mistake still names the file
        load_config(str(path), ["train.lr=1e-3"])
    assert str(info.value) == f"{path}: train.max_steps: expected an integer, got str 'many'"


def test_nearest_global_batches_split_over_the_ranks() -> None:
    assert nearest_global_batches(96, 4096, 64) == [64 * 4096, 128 * 4096]
    assert nearest_global_batches(32, 256, 3) == [30 * 256, 33 * 256]
    assert nearest_global_batches(2, 10, 4) == [40]  # nothing below: only the one above
    for tokens in nearest_global_batches(1000, 7, 48):
        assert (tokens // 7) % 48 == 0
    with pytest.raises(ConfigError) as info:
        split_global_batch(32, 256, 3, None, 8)
    assert str(info.value) == (
        "train.global_batch_tokens: 32 sequences per step do not split over 3 ranks; "
        "the nearest that do: 7,680 (30 x 256) or 8,448 (33 x 256)"
    )
    assert split_global_batch(32, 256, 4, None, 8) == (8, 1)
    assert split_global_batch(48, 256, 2, None, 5) == (4, 6)  # largest divisor of 24 <= 5


def test_no_checkpoint_message_says_where_it_looked(tmp_path: Path) -> None:
    from trainer.checkpointing.checkpoint import CheckpointError
    from trainer.inference import resolve_checkpoint

    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: no complete checkpoint found (looked for {tmp_path}/manifest.json, and "
        f"for step_* folders with one in {tmp_path / 'checkpoints'} and {tmp_path})"
    )


# ---------------------------------------------------------------------------- plan -> dry-run
def _configured_memory_gib(report: str) -> tuple[int, float]:
    match = re.search(r"zero-(\d):\s+([\d.]+) GiB device .*<- configured", report)
    assert match, report[-2000:]
    return int(match.group(1)), float(match.group(2))


def test_planned_config_dry_run_memory_equals_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "planned.yaml"
    argv = ["plan", "--gpus", "64", "--hours", "168", "--gpu", "H100", "--json"]
    assert main([*argv, "--out", str(out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    written = yaml.safe_load(out.read_text())
    assert written["parallel"]["precision"] == "bf16"
    assert written["parallel"]["planned_world_size"] == 64
    assert out.read_text().startswith("# written by `scaletrain plan`")

    assert main(["train", str(out), "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "world size 64 from parallel.planned_world_size" in report
    stage, gib = _configured_memory_gib(report)
    assert stage == plan["zero_stage"]
    assert gib == pytest.approx(
        plan["memory_gb"]["model_states_by_zero_stage"][str(stage)], abs=1e-3
    )
    # Control: planned for one rank, the same config needs far more per rank.
    assert main(["train", str(out), "--dry-run", "--world-size", "1"]) == 0
    assert _configured_memory_gib(capsys.readouterr().out)[1] > 2 * gib


# ---------------------------------------------------------------------------- real-size configs
@pytest.mark.parametrize(("name", "world_size"), [("1b", 8), ("7b", 64), ("moe-8x-1b-active", 16)])
def test_real_size_configs_dry_run(
    name: str, world_size: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "configs" / f"{name}.yaml")
    assert main(["train", config, "--dry-run", "--world-size", str(world_size)]) == 0
    report = capsys.readouterr().out
    assert f"memory per rank, model states (bf16, world size {world_size}" in report
    stage, gib = _configured_memory_gib(report)
    assert 0 < gib < 70  # fits an 80 GB GPU with room for activations
    raw = yaml.safe_load(Path(config).read_text())
    assert stage == raw["parallel"]["zero_stage"]


# ---------------------------------------------------------------------------- slurm
def test_slurm_script_goes_to_the_run_dir_named_after_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VIRTUAL_ENV", "/opt/envs/train env")
    run_dir = tmp_path / "runs" / "tiny"
    args = ["launch", "slurm", TINY, "--nodes", "2", "--gpus-per-node", "8"]
    assert main([*args, "--set", f"run.dir={run_dir}"]) == 0
    script_path = run_dir / "tiny.sbatch"
    assert f"wrote {script_path}" in capsys.readouterr().out
    script = script_path.read_text()
    assert "#SBATCH --job-name=tiny" in script
    assert f"#SBATCH --output={run_dir}/%x-%j.out" in script
    assert f"#SBATCH --chdir={os.getcwd()}" in script
    assert "source '/opt/envs/train env/bin/activate'" in script
    # The environment is entered before `set -u` (activate scripts read unset variables).
    assert script.index("bin/activate") < script.index("set -euo pipefail")
    assert script.rstrip().endswith(f"train {TINY} --set run.dir={run_dir}")

    assert main([*args, "--set", f"run.dir={run_dir}", "--set", "run.name=ablation-3"]) == 0
    assert "#SBATCH --job-name=ablation-3" in (run_dir / "ablation-3.sbatch").read_text()


def test_activation_lines_for_each_kind_of_environment() -> None:
    from launch.slurm import activation_lines

    assert activation_lines({"VIRTUAL_ENV": "/v"}, "/v", "/usr") == ("source /v/bin/activate",)
    # A venv's interpreter run without activating it: sys.prefix is the venv.
    assert activation_lines({}, "/v", "/usr") == ("source /v/bin/activate",)
    conda = {"CONDA_PREFIX": "/c/envs/lm", "CONDA_EXE": "/c/bin/conda"}
    assert activation_lines(conda, "/c/envs/lm", "/c/envs/lm") == (
        "source /c/etc/profile.d/conda.sh",
        "conda activate /c/envs/lm",
    )
    assert activation_lines({"CONDA_PREFIX": "/c/envs/lm"}, "/c/envs/lm", "/c/envs/lm") == (
        'export PATH=/c/envs/lm/bin:"$PATH"',
    )
    assert activation_lines({}, "/usr", "/usr") == ()  # system Python: nothing to enter


# ---------------------------------------------------------------------------- export
def test_export_files_follow_the_umask_and_log_no_tokenizer_warning(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from data_pipeline.tokenizer import train_tokenizer
    from tests.helpers import synthetic_document
    from trainer.hf_checkpoint import import_hf

    rng = random.Random(0)
    tokenizer = train_tokenizer([synthetic_document(rng) for _ in range(300)], vocab_size=320)
    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    tokenizer.save(hf_dir)
    warnings: list[str] = []
    collector = logging.Handler()
    collector.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(collector)
    previous = os.umask(0o027)
    try:
        checkpoint = import_hf(hf_dir, tmp_path / "ckpt")
        assert main(["export", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
        assert not [w for w in warnings if "Token indices sequence length" in w]
        # Control: the collector does see the warning when a tokenizer call asks for it.
        reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", model_max_length=8)
        reloaded(" ".join(["def f(x): return x"] * 20))
        assert [w for w in warnings if "Token indices sequence length" in w]
    finally:
        os.umask(previous)
        transformers_logger.removeHandler(collector)
    # 0666 under umask 027, not safetensors' own 0600: the import's and the export's.
    assert stat.S_IMODE((checkpoint / "model.safetensors").stat().st_mode) == 0o640
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o640 and modes["config.json"] == 0o640


# ---------------------------------------------------------------------------- logging
def test_log_lines_do_not_run_into_the_progress_bar() -> None:
    from tqdm import tqdm

    from launch.logging_setup import TqdmHandler

    def drawn(handler: logging.Handler, stream: io.StringIO) -> list[str]:
        log = logging.getLogger("tests.progress")
        log.propagate = False
        log.addHandler(handler)
        try:
            bar = tqdm(total=4, file=stream, desc="train", mininterval=0, ascii=True)
            bar.update(1)
            log.warning("eval loss 3.21")
            bar.update(1)
            bar.close()
        finally:
            log.removeHandler(handler)
        # What a terminal shows per line: the text after the last carriage return.
        return [line.rsplit("\r", 1)[-1] for line in stream.getvalue().split("\n")]

    stream = io.StringIO()
    assert "eval loss 3.21" in drawn(TqdmHandler(stream), stream)
    stream = io.StringIO()  # control: a plain handler appends to the bar's line
    lines = drawn(logging.StreamHandler(stream), stream)
    assert "eval loss 3.21" not in lines
    assert any(line.endswith("eval loss 3.21") and "train" in line for line in lines)


def test_library_chatter_goes_to_the_log_not_stdout(caplog: pytest.LogCaptureFixture) -> None:
    from launch.logging_setup import LibraryOutputFilter

    out = io.StringIO()
    stdout = LibraryOutputFilter(out)
    with caplog.at_level(logging.DEBUG, logger="deepspeed"):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=stdout)
        print(
            "[2026-12-01 05:41:37,464] [WARNING] [real_accelerator.py:213:get_accelerator] "
            "Setting accelerator to CPU.",
            file=stdout,
        )
        print("Time to load cpu_adam op: 31.2 seconds", file=stdout)
        print("a result line", file=stdout)
        print("partial", end="", file=stdout)
    assert out.getvalue() == "a result line\n"
    stdout.flush()
    assert out.getvalue() == "a result line\npartial"
    records = {(r.levelname, r.getMessage()) for r in caplog.records if r.name == "deepspeed"}
    assert records == {
        ("DEBUG", "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"),
        ("WARNING", "Setting accelerator to CPU."),
        ("DEBUG", "Time to load cpu_adam op: 31.2 seconds"),
    }


def test_accelerator_is_chosen_before_deepspeed_and_a_users_choice_kept() -> None:
    import torch

    from launch.logging_setup import choose_accelerator

    environ: dict[str, Any] = {}
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_accelerator(environ) == expected and environ == {"DS_ACCELERATOR": expected}
    assert choose_accelerator({"DS_ACCELERATOR": "xpu"}) == "xpu"
