"""The golden loss curve: 20 steps of the `tiny` preset in fp32 on the synthetic corpus.

`make golden` (python -m tests.golden --write) regenerates tests/assets/golden_tiny_fp32.json;
do that only for an intended numerics change, and say so in the commit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from tests.helpers import read_metrics, small_config, write_corpus

GOLDEN = Path(__file__).parent / "assets" / "golden_tiny_fp32.json"
STEPS = 20


def golden_config(workdir: Path) -> dict[str, Any]:
    corpus = workdir / "corpus"
    write_corpus(corpus)
    config = small_config(workdir / "run", corpus)
    config["model"] = {"preset": "tiny", "max_seq_len": 128}
    config["tokenizer"] = {"vocab_size": 512}
    config["train"].update(max_steps=STEPS, global_batch_tokens=1024, eval_every=0, warmup_steps=5)
    return config


def run_golden(workdir: Path) -> list[float]:
    """Train the golden config in this process; return the per-step losses."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.trainer import Trainer

    trainer = Trainer(job_config_from_dict(golden_config(workdir)), detect_environment())
    trainer.setup()
    trainer.fit()
    train_lines, _ = read_metrics(workdir / "run")
    return [line["loss"] for line in train_lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="overwrite the checked-in curve")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        losses = run_golden(Path(tmp))
    print(json.dumps(losses, indent=1))
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"steps": STEPS, "losses": losses}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
