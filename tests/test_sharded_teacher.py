"""Distillation's teacher at ZeRO-3: sharded over the ranks (trainer/frozen.py) but for its
output matrix, hashed whole, and giving the whole teacher's loss and student gradients.

Two ranks on gloo run tests/sharded_teacher_worker.py; the end-to-end `scaletrain distill` on
two ranks at ZeRO-2 and ZeRO-3 against one rank is in tests/test_distill_stage.py (slow).
"""

from __future__ import annotations

from pathlib import Path

from tests.test_sharded_reference import run_worker


def test_zero3_teacher_is_sharded_and_distills_like_the_whole_teacher(tmp_path: Path) -> None:
    ranks = run_worker(tmp_path, 2, 3, module="tests.sharded_teacher_worker")
    for rank in ranks:
        assert rank["sharded"]
        assert rank["full"] == rank["whole_numel"]
        # Each rank holds its half of every parameter (DeepSpeed pads a partition by < 2).
        assert rank["full"] / 2 <= rank["local"] < rank["full"] / 2 + 64
        assert rank["big_released"]  # gathered for the teacher's forward, freed after it
        assert rank["sha_sharded"] == rank["sha_whole"]
        assert rank["loss"] > 0.1  # a real divergence, not a trivially equal zero
        assert rank["loss_gap"] < 1e-6 and rank["kd_gap"] < 1e-6
        assert rank["grad_gap"] < 1e-6
        # Negative control: the head's own (partitioned) parameter cannot serve the loss.
        assert rank["headless_failed"]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank distilled its own batch
