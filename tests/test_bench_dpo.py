"""bench/dpo.py's pieces on the tests' tiny base, so the benchmark cannot rot: a live-reference
mode and a LoRA + cache mode step, start at ln 2 and report what each holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.dpo import Runner, dpo_config, paired_speedup
from tests.pref_helpers import base_run, write_pairs


def test_live_and_lora_cache_modes_step_from_ln2(
    tmp_path_factory: pytest.TempPathFactory, corpus: Path
) -> None:
    folder = tmp_path_factory.mktemp("bench_dpo")
    base = base_run(folder / "base", corpus)
    pairs = write_pairs(folder / "pairs.jsonl", 8, 0)

    def runner(name: str, rank: int, cache: bool) -> Runner:
        raw = dpo_config(
            base, pairs, folder / name, lora_rank=rank, cache=cache, pairs_per_step=2, steps=2
        )
        raw["data"]["seq_len"] = 64
        return Runner(name, raw)

    live, lora_cache = runner("full-live", 0, False), runner("lora-cache", 4, True)
    for _ in range(2):
        live.step()
        lora_cache.step()
    full, lora = live.summary(2), lora_cache.summary(2)
    for row in (full, lora):
        assert abs(row["first_dpo_loss"] - math.log(2)) < 1e-6, row
        assert row["steps"] == 2 and row["pairs_per_s"] > 0
    assert full["prepass_s"] is None and lora["prepass_s"] > 0
    # The full mode holds a reference copy as large as the policy; the cache mode none.
    assert full["reference_model_bytes"] == 4 * full["trainable_params"]
    assert lora["reference_model_bytes"] == 0
    assert 0 < lora["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert paired_speedup([2.0, 2.0, 4.0], [9.0, 1.0, 1.0]) == 3.0
