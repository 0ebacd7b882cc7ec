"""DPO's reference at ZeRO-3: sharded over the ranks (trainer/frozen.py), hashed whole, and
its precompute pre-pass equal to the whole model's log-probs with the ranks' forwards in step.

Two ranks on gloo run tests/sharded_reference_worker.py (about 10 s here); the end-to-end
`scaletrain dpo` runs at ZeRO-3 on two ranks are in tests/test_dpo_stage.py (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from model import build_model
from model.config import ModelConfig
from tests.sharded_reference_worker import VOCAB
from trainer.config import JobConfig, ParallelConfig
from trainer.deepspeed_config import frozen_deepspeed_config
from trainer.frozen import is_sharded, partition_numels, shard_frozen
from trainer.reference_cache import model_weights_sha256

ROOT = Path(__file__).resolve().parents[1]


def run_worker(
    out: Path, nproc: int, zero_stage: int, module: str = "tests.sharded_reference_worker"
) -> list[dict[str, Any]]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", module, str(out), str(zero_stage)]
    # A rank whose forwards fell out of step with the other's would hang in a gather.
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(nproc)]


def test_zero3_reference_is_sharded_in_halves_hashed_whole_and_precomputes_exactly(
    tmp_path: Path,
) -> None:
    ranks = run_worker(tmp_path, 2, 3)
    shape = ModelConfig(vocab_size=VOCAB, dim=256, n_layers=1, n_heads=4, max_seq_len=64)
    one_rank_sha = model_weights_sha256(build_model(shape, "cpu", seed=5))
    for rank in ranks:
        assert rank["sharded"]
        assert rank["full"] == rank["whole_numel"]
        # Each rank holds its half of every parameter (DeepSpeed pads a partition by < 2).
        assert rank["full"] / 2 <= rank["local"] < rank["full"] / 2 + 64
        assert rank["big_released"]  # gathered for the forward, freed after it
        assert rank["sha_before"] == rank["sha_gathered"] == one_rank_sha
        assert rank["logits_gap"] < 1e-6
        # Three micro-batches over two ranks: one rank ran a padding forward.
        assert rank["precompute_gap"] < 1e-6


def test_below_zero3_the_reference_stays_a_whole_module() -> None:
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2), "cpu")
    for stage in (0, 1, 2):
        config = JobConfig(parallel=ParallelConfig(zero_stage=stage, precision="fp32"))
        frozen = shard_frozen(model, config, 2, 2, "test")
        assert frozen is model and not is_sharded(frozen) and not frozen.training
        assert all(not p.requires_grad for p in frozen.parameters())
        numel = sum(p.numel() for p in model.parameters())
        assert partition_numels(frozen) == (numel, numel)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_frozen_config_has_no_optimizer_and_keeps_fp32(offload: str) -> None:
    parallel = ParallelConfig(zero_stage=3, precision="bf16", offload=offload)
    ds = frozen_deepspeed_config(parallel, 2, 4)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero
    assert ("offload_param" in zero) == (offload == "cpu")
    assert "bf16" not in ds and "fp16" not in ds and "optimizer" not in ds
    assert "gradient_clipping" not in ds
    assert ds["train_batch_size"] == 2 * 4 and ds["gradient_accumulation_steps"] == 1
