"""SFT throughput and memory: full fine-tuning against LoRA, same model, data and steps.

Each round runs `scaletrain sft`'s Trainer twice in this process, full (lora.rank 0) then LoRA,
from the same checkpoint on the same conversations (configs/sft-tiny.yaml: packed
builtin:stdlib-instruct, chatml), so machine noise hits both alike; the ratio is the figure to
read. Reported per mode: median tokens/s over the steps after the first (from metrics.jsonl),
trainable parameters, the optimizer-state bytes actually held (every tensor in the optimizer's
state after training), and on CUDA the peak allocated memory of the run.

Run:  python -m bench.sft --init-from runs/tiny [--steps 8 --rounds 2 --rank 16]
Prints one JSON line per run and a summary line with the LoRA / full ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_once(base: dict[str, Any], run_dir: Path, rank: int, steps: int) -> dict[str, Any]:
    """One sft run of `steps` steps; its measured figures."""
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
    trainer = Trainer(job_config_from_dict(raw, stage="sft"), detect_environment(), "sft")
    trainer.setup()
    trainer.fit()
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
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    del trainer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init-from", required=True, help="checkpoint or run dir to fine-tune")
    parser.add_argument("--config", default=str(ROOT / "configs" / "sft-tiny.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = yaml.safe_load(Path(args.config).read_text())
    base["model"] = {"init_from": args.init_from}
    results: dict[str, list[dict[str, Any]]] = {"full": [], "lora": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for mode, rank in (("full", 0), ("lora", args.rank)):
                run_dir = Path(scratch) / f"{mode}-{round_index}"
                result = run_once(base, run_dir, rank, args.steps)
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
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
