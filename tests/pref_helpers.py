"""Shared pieces of the preference-stage tests: a tiny base run and learnable pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tests.helpers import small_config

WORDS = ["value", "count", "items", "result", "node", "total", "index", "buffer", "name", "size"]


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """Learnable pairs: the chosen answer is "good WORD", the rejected one "bad WORD" (a
    preference for one token at the answer's start, which held-out prompts share)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            word, other = rng.sample(WORDS, 2)
            record = {
                "prompt": f"Repeat the word {word}.",
                "chosen": f"good {word} {other}",
                "rejected": f"bad {word} {other}",
            }
            handle.write(json.dumps(record) + "\n")
    return path


def base_run(folder: Path, corpus: Path) -> Path:
    """Pretrain the 2-layer model of tests.helpers for 2 steps; returns its run dir."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.trainer import Trainer

    raw = small_config(
        folder, corpus, train={"max_steps": 2, "eval_every": 0}, checkpoint={"every": 1}
    )
    trainer = Trainer(job_config_from_dict(raw), detect_environment())
    trainer.setup()
    trainer.fit()
    return folder


def preference_config(
    run_dir: Path, base: Path, pairs: Path, validation: Path, **sections: dict[str, Any]
) -> dict[str, Any]:
    """A dpo/rm config on `base` (4 pairs per step, 2 per micro-batch), chatml template."""
    config: dict[str, Any] = {
        "run": {"dir": str(run_dir), "seed": 7},
        "model": {"init_from": str(base)},
        "data": {
            "seq_len": 64,
            "train": [{"path": str(pairs), "name": "pairs"}],
            "validation": [{"path": str(validation), "name": "pairs"}],
        },
        "train": {
            "max_steps": 3,
            "global_batch_tokens": 512,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 0,
            "eval_every": 0,
            "eval_batches": 2,
            "progress": False,
            "sample_prompt": None,
        },
        "parallel": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"every": 0, "keep": 3},
        "chat": {"template": "chatml"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def run_stage(raw: dict[str, Any], stage: str) -> Path:
    """Train a preference stage in this process; returns the run dir."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.stages import get_stage
    from trainer.trainer import Trainer

    get_stage(stage)  # registers the stage's config sections
    trainer = Trainer(job_config_from_dict(raw, stage=stage), detect_environment(), stage)
    trainer.setup()
    trainer.fit()
    return Path(raw["run"]["dir"])


def cli(stage: str, config: dict[str, Any], folder: Path, *extra: str) -> Any:
    """`scaletrain STAGE CONFIG ...` in a subprocess (a crash exits it, not the tests)."""
    import os
    import subprocess
    import sys

    import yaml

    path = folder / f"config-{len(list(folder.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", stage, str(path), *extra],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        timeout=600,
    )
