"""DPO step time and memory: a live reference against the precomputed cache, full against LoRA.

Four modes of `scaletrain dpo`'s Trainer on the same starting checkpoint, the same pairs and
the same batches (fp32, ZeRO-0, loss sigmoid):
  full-live    full policy + a frozen reference copy (one no-grad forward per step)
  full-cache   full policy + `dpo.precompute_reference: true` (a pre-pass, then no reference)
  lora-live    LoRA, the reference is the policy with its adapters off (no copy, one forward)
  lora-cache   LoRA + the cache

Speed: the four Trainers are set up in this process and stepped in turn (step s of every mode,
the order rotated each step), so machine noise hits all alike. A step is the loop's
`loader.next_step()` + `Trainer.train_step()` (what `fit` times as a step). Reported per mode:
pairs/s and the median step time over the steps after the first, the pre-pass time (cache
modes), the first `dpo_loss` (ln 2 = 0.693147 when the reference equals the policy), the
optimizer-state bytes held and the trainable parameters.

Memory: one fresh child process per mode (`--memory-child MODE`), which resets the kernel's
peak-RSS counter (/proc/self/clear_refs) after its imports and reads VmHWM after setup (the
setup peak: data, model, reference, pre-pass) and again, after another reset, after its steps
(the training peak: the step's weights, gradients, optimizer state and activations). On CUDA
the child reports torch.cuda.max_memory_allocated instead. The children run with glibc's
MALLOC_MMAP_THRESHOLD_=131072 (a fixed threshold: freed tensors go back to the kernel), else
the peak RSS mostly shows how the heap grew.

Data: the first `--pairs` records of `builtin:stdlib-preference` (train split), written to a
JSON-lines file so that the cache pre-pass covers only the pairs the steps use.

Threads: one torch thread by default (`--threads`). On a CPU shared with other jobs, two
threads on two busy cores wait on each other and single steps stall for seconds (measured:
0.1 to 7.9 s for the same step); one thread gave steady times. Summary ratios are also given
per step (median over steps of the time ratio on the same batch).

Run:  python -m bench.dpo [--init-from RUN_DIR] [--steps 30 --pairs-per-step 4 --rank 16]
Without --init-from, a base is built first (configs/tiny.yaml, 2 pretraining steps).
Prints one JSON line per mode and a summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODES: dict[str, tuple[bool, bool]] = {  # name: (LoRA, cache)
    "full-live": (False, False),
    "full-cache": (False, True),
    "lora-live": (True, False),
    "lora-cache": (True, True),
}
LN2 = math.log(2)


# ---------------------------------------------------------------------------- inputs
def build_base(folder: Path) -> Path:
    """A starting checkpoint: configs/tiny.yaml (4,096-piece tokenizer) after 2 steps."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.trainer import Trainer

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["run"]["dir"] = str(folder)
    raw["tokenizer"]["train_max_sentences"] = 20000
    raw["train"].update(
        max_steps=2, global_batch_tokens=2048, eval_every=0, sample_prompt=None, progress=False
    )
    raw["checkpoint"] = {"every": 0, "keep": 1, "resume": "none"}
    trainer = Trainer(job_config_from_dict(raw), detect_environment())
    trainer.setup()
    trainer.fit()
    return folder


def write_pairs(path: Path, count: int) -> Path:
    """The first `count` records of builtin:stdlib-preference's train split, as JSON lines."""
    from itertools import islice

    from data_pipeline.preference import stdlib_preference_records

    with open(path, "w", encoding="utf-8") as handle:
        for _, record in islice(stdlib_preference_records("train"), count):
            handle.write(json.dumps(record) + "\n")
    return path


def dpo_config(
    init_from: Path,
    pairs: Path,
    run_dir: Path,
    *,
    lora_rank: int,
    cache: bool,
    pairs_per_step: int,
    steps: int,
    seq_len: int = 256,
    beta: float = 0.1,
    lr: float = 1e-4,
) -> dict[str, Any]:
    """A dpo config: one micro-batch of `pairs_per_step` pairs per step, constant lr, no
    weight decay, fp32, ZeRO-0, no eval, no checkpoints."""
    sequences = 2 * pairs_per_step
    return {
        "run": {"dir": str(run_dir), "seed": 1234},
        "model": {"init_from": str(init_from)},
        "chat": {"template": "chatml"},
        "dpo": {"loss": "sigmoid", "beta": beta, "precompute_reference": cache},
        "sft": {"truncation": "drop"},
        "lora": {"rank": lora_rank, "alpha": 2.0 * lora_rank} if lora_rank else {"rank": 0},
        "data": {
            "seq_len": seq_len,
            "train": [{"path": str(pairs), "name": "pairs"}],
            "validation": [],
        },
        "train": {
            "max_steps": steps,
            "global_batch_tokens": sequences * seq_len,
            "micro_batch_size": sequences,
            "lr": lr,
            "warmup_steps": 0,
            "schedule": "constant",
            "weight_decay": 0.0,
            "eval_every": 0,
            "progress": False,
            "sample_prompt": None,
        },
        "parallel": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"every": 0, "keep": 1, "resume": "none"},
    }


# ---------------------------------------------------------------------------- one mode
@contextlib.contextmanager
def timed_prepass() -> Iterator[list[float]]:
    """Record the seconds spent in the dpo stage's reference pre-pass (trainer.dpo._precompute)."""
    import trainer.dpo as dpo_stage

    spent: list[float] = []
    original = dpo_stage._precompute

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    dpo_stage._precompute = wrapper
    try:
        yield spent
    finally:
        dpo_stage._precompute = original


class Runner:
    """One set-up dpo Trainer, stepped one optimizer step at a time like `Trainer.fit` does."""

    def __init__(self, name: str, raw: dict[str, Any]) -> None:
        from launch.environment import detect_environment
        from trainer.config import job_config_from_dict
        from trainer.stages import get_stage
        from trainer.trainer import Trainer

        get_stage("dpo")
        self.name = name
        started = time.perf_counter()
        with timed_prepass() as prepass:
            self.trainer = Trainer(
                job_config_from_dict(raw, stage="dpo"), detect_environment(), "dpo"
            )
            self.trainer.setup()
        self.setup_s = time.perf_counter() - started
        self.prepass_s = sum(prepass) if prepass else None
        self.trainer.engine.train()
        self.times: list[float] = []
        self.first_metrics: dict[str, float] | None = None

    def step(self) -> float:
        trainer = self.trainer
        started = time.perf_counter()
        result = trainer.train_step(trainer.loader.next_step())
        elapsed = time.perf_counter() - started
        trainer.step += 1
        self.times.append(elapsed)
        if self.first_metrics is None:
            self.first_metrics = dict(result.metrics)
        return elapsed

    def optimizer_state_bytes(self) -> int:
        return sum(
            value.numel() * value.element_size()
            for state in self.trainer.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.trainer.module.parameters() if p.requires_grad)

    def reference_bytes(self) -> int:
        """Bytes of a separate reference model held during training (0: cache or adapters off)."""
        reference = getattr(self.trainer.objective, "reference", None)
        if reference is None:
            return 0
        return sum(p.numel() * p.element_size() for p in reference.parameters())

    def summary(self, pairs_per_step: int) -> dict[str, Any]:
        median = statistics.median(self.times[1:] or self.times)
        first = self.first_metrics or {}
        return {
            "mode": self.name,
            "steps": len(self.times),
            "pairs_per_step": pairs_per_step,
            "median_step_s": median,
            "pairs_per_s": pairs_per_step / median,
            "prepass_s": self.prepass_s,
            "setup_s": self.setup_s,
            "first_dpo_loss": first.get("dpo_loss"),
            "first_loss_minus_ln2": None if "dpo_loss" not in first else first["dpo_loss"] - LN2,
            "first_logps_chosen": first.get("logps_chosen"),
            "trainable_params": self.trainable_params(),
            "optimizer_state_bytes": self.optimizer_state_bytes(),
            "reference_model_bytes": self.reference_bytes(),
        }


# ---------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the peak-RSS counter to the current RSS; return that RSS in bytes."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def memory_child(mode: str, raw: dict[str, Any], steps: int) -> dict[str, Any]:
    """Peak memory growth of setting up and training one mode (run in a fresh process)."""
    import launch.environment  # noqa: F401  (imports outside the measured span)
    import trainer.trainer  # noqa: F401

    base = _reset_peak()
    runner = Runner(mode, raw)
    setup_peak = _peak() - base
    base = _reset_peak()
    for _ in range(steps):
        runner.step()
    return {
        "mode": mode,
        "memory": "cuda allocated" if torch.cuda.is_available() else "peak RSS (VmHWM)",
        "setup_peak_growth_bytes": setup_peak,
        "train_peak_growth_bytes": _peak() - base,
        "steps": steps,
    }


def measure_memory(
    mode: str, raw: dict[str, Any], steps: int, threads: int, scratch: Path
) -> dict[str, Any]:
    config = scratch / f"memory-{mode}.json"
    config.write_text(json.dumps(raw))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        # glibc: blocks from 128 KiB are mmapped and unmapped at free, so VmHWM follows the
        # bytes in use (with its default, adaptive threshold freed tensors stay in the heap).
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.dpo",
            "--memory-child",
            mode,
            "--child-config",
            str(config),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory child {mode} failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init-from", help="checkpoint or run dir (default: build one)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument(
        "--pairs", type=int, default=0, help="pairs written (default steps x pairs/step)"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default; see above)"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-mode child processes"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        raw = json.loads(Path(args.child_config).read_text())
        print(json.dumps(memory_child(args.memory_child, raw, args.steps)), flush=True)
        return
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown} (choose from {', '.join(MODES)})")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        init_from = Path(args.init_from) if args.init_from else build_base(scratch / "base")
        pairs = write_pairs(scratch / "pairs.jsonl", args.pairs or args.steps * args.pairs_per_step)

        def config(mode: str, tag: str) -> dict[str, Any]:
            lora, cache = MODES[mode]
            return dpo_config(
                init_from,
                pairs,
                scratch / f"{tag}-{mode}",
                lora_rank=args.rank if lora else 0,
                cache=cache,
                pairs_per_step=args.pairs_per_step,
                steps=args.steps,
                seq_len=args.seq_len,
            )

        runners = [Runner(mode, config(mode, "speed")) for mode in modes]
        for step in range(args.steps):  # step s of every mode, the order rotated each step
            shift = step % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                runner.step()
        results = {runner.name: runner.summary(args.pairs_per_step) for runner in runners}
        times = {runner.name: runner.times for runner in runners}
        del runners
        if not args.no_memory:
            for mode in modes:
                results[mode].update(
                    measure_memory(mode, config(mode, "memory"), args.steps, args.threads, scratch)
                )
        for result in results.values():
            print(json.dumps(result), flush=True)
    summary: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    for mode, result in results.items():
        summary[f"{mode}_pairs_per_s"] = result["pairs_per_s"]
    if "full-live" in results:
        for mode in modes:
            if mode != "full-live":
                summary[f"{mode}_over_full-live_speed"] = (
                    results[mode]["pairs_per_s"] / results["full-live"]["pairs_per_s"]
                )
                summary[f"{mode}_over_full-live_speed_per_step"] = paired_speedup(
                    times["full-live"], times[mode]
                )
    print(json.dumps(summary))


def paired_speedup(baseline: list[float], other: list[float]) -> float:
    """Median over steps (after the first) of baseline time / other time on the same step:
    both ran the same batch back to back, so the ratio is less exposed to load changes."""
    return statistics.median(a / b for a, b in zip(baseline[1:], other[1:], strict=True))


if __name__ == "__main__":
    main()
