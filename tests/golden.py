"""The golden loss curve: 20 steps of the `tiny` preset in fp32 on the synthetic corpus.

`make golden` (python -m tests.golden --write) regenerates tests/assets/golden_tiny_fp32.json;
do that only for an intended numerics change, and say so in the commit.

What it guarantees: the run uses one intra-op thread, so its sums are taken in one order on any
core count. The BLAS kernels still depend on the CPU's instruction set and the torch build,
so the file records those (`fingerprint`); on a matching machine the test demands equal losses
bit for bit, elsewhere equality within 1e-5 relative (code changes move losses by more).
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


def fingerprint() -> dict[str, str]:
    """What besides the code decides the golden losses: the torch build and the CPU kernels."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run_golden(workdir: Path) -> list[float]:
    """Train the golden config in this process on one thread; return the per-step losses."""
    import torch

    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(job_config_from_dict(golden_config(workdir)), detect_environment())
        trainer.setup()
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
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
        GOLDEN.write_text(
            json.dumps({"steps": STEPS, "fingerprint": fingerprint(), "losses": losses}, indent=1)
            + "\n"
        )
        print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
