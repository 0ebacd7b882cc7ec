"""SFT throughput and memory: full fine-tuning against LoRA, same model, data and steps.

Each round runs `scaletrain sft`'s Trainer twice, full (lora.rank 0) then LoRA, from the same
checkpoint on the same conversations (configs/sft-tiny.yaml: packed builtin:stdlib-instruct,
chatml), so machine noise hits both alike; the ratio is the figure to read. Each run is a fresh
child process (`--child`), so its peak memory is its own. Reported per mode: median tokens/s
over the steps after the first (from metrics.jsonl), trainable parameters, the optimizer-state
bytes actually held (every tensor in the optimizer's state after training), resident memory
(Linux /proc/self/status; the high-water mark VmHWM is reset through /proc/self/clear_refs
before each phase): `setup_rss_growth_bytes`, what `Trainer.setup` leaves resident (model,
engine, tokenized data, lazily imported modules), and `train_peak_rss_growth_bytes`, the
high-water mark of `fit` less the resident size after setup (gradients, optimizer state,
activations and logits of the steps, the final save) -- the figure that differs between
modes; `peak_rss_bytes` is the whole process's peak. On CUDA, the peak allocated memory.

Run:  python -m bench.sft --init-from runs/tiny [--steps 8 --rounds 2 --rank 16]
Prints one JSON line per run and a summary line with the LoRA / full ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def memory_status_bytes(field: str) -> int | None:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current resident size (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_once(base: dict[str, Any], run_dir: Path, rank: int, steps: int) -> dict[str, Any]:
    """One sft run of `steps` steps; its measured figures (resident memory: this process's, so
    run it in a fresh process)."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.stages import get_stage
    from trainer.trainer import Trainer

    get_stage("sft")
    raw = json.loads(json.dumps(base))
    raw["run"]["dir"] = str(run_dir)
    raw["train"].update(max_steps=steps, eval_every=0, progress=False, warmup_steps=0)
    raw["checkpoint"] = {"every": 0, "keep": 1, "resume": "none"}
    raw["sft"]["sample_chat"] = None
    raw["lora"] = {"rank": rank, "alpha": 2.0 * rank} if rank else {"rank": 0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    rss_start = memory_status_bytes("VmRSS")
    trainer = Trainer(job_config_from_dict(raw, stage="sft"), detect_environment(), "sft")
    trainer.setup()
    setup_peak = memory_status_bytes("VmHWM")
    rss_after_setup = memory_status_bytes("VmRSS")
    peak_reset = reset_peak_rss()
    trainer.fit()
    train_peak = memory_status_bytes("VmHWM")
    optimizer_bytes = sum(
        value.numel() * value.element_size()
        for state in trainer.optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [line["tokens_per_s"] for line in lines if "tokens_per_s" in line][1:]
    result = {
        "mode": f"lora r{rank}" if rank else "full",
        "steps": steps,
        "tokens_per_s": statistics.median(speeds),
        "trainable_params": trainable,
        "optimizer_state_bytes": optimizer_bytes,
        "final_loss": lines[-1]["loss"],
        "setup_rss_growth_bytes": difference(rss_after_setup, rss_start),
        "train_peak_rss_growth_bytes": difference(train_peak, rss_after_setup)
        if peak_reset
        else None,
        "peak_rss_bytes": max(setup_peak or 0, train_peak or 0) or None,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    del trainer
    return result


def difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def run_in_child(config: str, init_from: str, run_dir: Path, rank: int, steps: int) -> dict:  # type: ignore[type-arg]
    """`run_once` in a fresh Python process (its own peak memory); its result."""
    command = [sys.executable, "-m", "bench.sft", "--init-from", init_from, "--config", config]
    command += ["--child", str(run_dir), "--rank", str(rank), "--steps", str(steps)]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench.sft child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_or_none(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init-from", required=True, help="checkpoint or run dir to fine-tune")
    parser.add_argument("--config", default=str(ROOT / "configs" / "sft-tiny.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one run into this dir: JSON out
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = yaml.safe_load(Path(args.config).read_text())
    base["model"] = {"init_from": args.init_from}
    if args.child:
        print(json.dumps(run_once(base, Path(args.child), args.rank, args.steps)))
        return
    results: dict[str, list[dict[str, Any]]] = {"full": [], "lora": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for mode, rank in (("full", 0), ("lora", args.rank)):
                run_dir = Path(scratch) / f"{mode}-{round_index}"
                result = run_in_child(args.config, args.init_from, run_dir, rank, args.steps)
                print(json.dumps(result), flush=True)
                results[mode].append(result)
    full_speed = statistics.median(r["tokens_per_s"] for r in results["full"])
    lora_speed = statistics.median(r["tokens_per_s"] for r in results["lora"])
    summary = {
        "full_tokens_per_s": full_speed,
        "lora_tokens_per_s": lora_speed,
        "lora_over_full_speed": lora_speed / full_speed,
        "lora_over_full_optimizer_bytes": results["lora"][0]["optimizer_state_bytes"]
        / results["full"][0]["optimizer_state_bytes"],
        "full_train_peak_rss_growth_bytes": median_or_none(
            results["full"], "train_peak_rss_growth_bytes"
        ),
        "lora_train_peak_rss_growth_bytes": median_or_none(
            results["lora"], "train_peak_rss_growth_bytes"
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
