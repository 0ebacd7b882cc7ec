"""One rank of tests/test_dpo_stage.py's sharded-reference check (run under torchrun, gloo).

Builds a small reference model whose largest parameters exceed DeepSpeed's persistence
threshold, hashes it whole, shards it with trainer/frozen.py at ZeRO-3 and writes, as JSON
to OUT/rank_<r>.json: the partition sizes, the hash before sharding and of the weights
gathered back, the largest gap between sharded and whole logits, whether the big parameters
are released after a forward, and the largest gap between the precompute pre-pass over the
sharded reference (micro-batches shared out, one rank padded) and the whole model's
log-probs of the same pairs.

    torchrun --nproc-per-node=N -m tests.sharded_reference_worker OUT ZERO_STAGE
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import torch

from data_pipeline.preference import TokenizedPair
from launch.environment import detect_environment
from model import build_model
from model.config import ModelConfig
from trainer.config import JobConfig, ParallelConfig
from trainer.distributed import deepspeed, init_distributed
from trainer.dpo import PairMicroBatches
from trainer.frozen import is_sharded, partition_numels, release_frozen, shard_frozen
from trainer.reference_cache import (
    batch_sequence_logps,
    compute_reference_logps,
    model_weights_sha256,
)

VOCAB, PAIRS, PER_MICRO = 512, 5, 2  # 3 micro-batches: on 2 ranks one of them pads


def pairs() -> list[TokenizedPair]:
    rng = random.Random(3)
    out = []
    for example_id in range(PAIRS):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 9))]
        chosen = prompt + [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 12))]
        rejected = prompt + [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 12))]
        out.append(TokenizedPair(chosen, len(prompt), rejected, len(prompt), None, example_id))
    return out


def main(out: Path, zero_stage: int) -> None:
    env = detect_environment()
    init_distributed(env, "gloo", timeout_s=120)  # a hang fails instead of waiting
    shape = ModelConfig(vocab_size=VOCAB, dim=256, n_layers=1, n_heads=4, max_seq_len=64)
    whole = build_model(shape, "cpu", seed=5).eval()
    sha_before = model_weights_sha256(whole)
    config = JobConfig(parallel=ParallelConfig(zero_stage=zero_stage, precision="fp32"))
    frozen = shard_frozen(copy.deepcopy(whole), config, 2, env.world_size, "test")
    local, full = partition_numels(frozen)

    batches = PairMicroBatches(pairs(), PER_MICRO, 0, torch.device("cpu"))
    with torch.no_grad():
        logits_gap = max(
            float((frozen(b.input_ids) - whole(b.input_ids)).abs().max()) for b in [batches[0]]
        )
    inner = getattr(frozen, "module", frozen)
    big = [p for p in inner.parameters() if getattr(p, "ds_numel", 0) > 100_000]
    released = bool(big) and all(p.data.numel() == 0 for p in big)

    # The weights gathered back from the partitions hash like the whole model.
    with deepspeed.zero.GatheredParameters(list(inner.parameters()), enabled=is_sharded(inner)):
        sha_gathered = model_weights_sha256(inner)

    cached, cached_rejected = compute_reference_logps(frozen, batches, PAIRS)
    live = torch.cat([cached, cached_rejected])
    with torch.no_grad():
        expected = torch.full_like(live, float("nan"))
        for i in range(len(batches)):
            batch = batches[i]
            logps = batch_sequence_logps(whole, batch)[0]
            ids = batch.extras["example_ids"]
            expected[ids] = logps[: batch.num_pairs]
            expected[PAIRS + ids] = logps[batch.num_pairs :]
    release_frozen(frozen)
    result = {
        "sharded": is_sharded(frozen),
        "local": local,
        "full": full,
        "whole_numel": sum(p.numel() for p in whole.parameters()),
        "sha_before": sha_before,
        "sha_gathered": sha_gathered,
        "logits_gap": logits_gap,
        "big_released": released,
        "precompute_gap": float((live - expected).abs().max()),
    }
    (out / f"rank_{env.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
