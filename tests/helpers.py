"""Shared test helpers: a deterministic synthetic corpus and small fast configs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

NAMES = ["value", "count", "items", "result", "node", "total", "index", "buffer", "name", "size"]
FUNCS = ["compute", "update", "render", "parse", "merge", "split", "load", "store", "check", "emit"]


def synthetic_document(rng: random.Random) -> str:
    """A small Python-like function: structured enough to learn, varied enough to matter."""
    func = rng.choice(FUNCS) + "_" + rng.choice(NAMES)
    args = rng.sample(NAMES, k=rng.randint(1, 3))
    lines = [f"def {func}({', '.join(args)}):"]
    for _ in range(rng.randint(2, 6)):
        target, source = rng.choice(NAMES), rng.choice(args)
        kind = rng.randint(0, 3)
        if kind == 0:
            lines.append(f"    {target} = {source} + {rng.randint(0, 99)}")
        elif kind == 1:
            lines.append(f"    for {target} in range({source}):")
            lines.append(f"        {rng.choice(args)} += {target}")
        elif kind == 2:
            lines.append(f"    if {source} > {rng.randint(0, 9)}:")
            lines.append(f"        return {target}")
        else:
            lines.append(f"    {target} = {rng.choice(FUNCS)}({source})")
    lines.append(f"    return {rng.choice(args)}")
    return "\n".join(lines) + "\n"


def write_corpus(
    folder: Path, n_train: int = 400, n_validation: int = 40, seed: int = 0
) -> tuple[Path, Path]:
    """Write train.jsonl and validation.jsonl of synthetic documents; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for name, count in (("train", n_train), ("validation", n_validation)):
        path = folder / f"{name}.jsonl"
        with path.open("w") as handle:
            for _ in range(count):
                handle.write(json.dumps({"text": synthetic_document(rng)}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


# A 2-layer tiny-moe shape (4 experts, top-2) whose steps take milliseconds.
TINY_MOE_MODEL: dict[str, Any] = {
    "preset": "tiny-moe",
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "max_seq_len": 128,
    "n_experts": 4,
    "top_k": 2,
    "moe_ffn_hidden_dim": 64,
}


def small_config(run_dir: Path, corpus: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A raw config for a 2-layer model on the synthetic corpus; steps take milliseconds."""
    train_file, validation_file = corpus / "train.jsonl", corpus / "validation.jsonl"
    config: dict[str, Any] = {
        "run": {"dir": str(run_dir), "seed": 7},
        "model": {
            "preset": "tiny",
            "dim": 64,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "max_seq_len": 128,
        },
        "tokenizer": {"vocab_size": 320},
        "data": {
            "seq_len": 64,
            "train": [{"path": str(train_file), "name": "synthetic"}],
            "validation": [{"path": str(validation_file), "name": "synthetic"}],
        },
        "train": {
            "max_steps": 8,
            "global_batch_tokens": 512,
            "lr": 3e-3,
            "warmup_steps": 2,
            "eval_every": 4,
            "eval_batches": 2,
            "progress": False,
            "sample_prompt": None,
        },
        "parallel": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"every": 0, "keep": 2},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training lines, eval lines) of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r and "eval_loss" not in r], [
        r for r in lines if "eval_loss" in r
    ]
