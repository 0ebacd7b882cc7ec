"""One rank of tests/test_sharded_teacher.py (run under torchrun, gloo).

Builds a small teacher (untied output head; its largest parameters exceed DeepSpeed's
persistence threshold), hashes it whole, keeps its output matrix and shards the rest with
trainer/frozen.py at ZeRO-3, then runs one distillation step of a small student against the
sharded teacher and against the whole one on the same rank-seeded batch, and writes as JSON to
OUT/rank_<r>.json: the partition sizes, both objectives' teacher hashes, the loss and gradient
gaps, whether the big teacher parameters are released after its forward, and whether an
objective without the kept output matrix fails (it would read a partition).

    torchrun --nproc-per-node=N -m tests.sharded_teacher_worker OUT ZERO_STAGE
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from data_pipeline.batch import causal_lm_batch
from launch.environment import detect_environment
from model import build_model
from model.config import ModelConfig
from trainer.config import JobConfig, ParallelConfig
from trainer.distributed import init_distributed
from trainer.frozen import is_sharded, partition_numels, shard_frozen
from trainer.objectives.distill import DistillConfig, DistillObjective

VOCAB, SEQ = 512, 32
TEACHER = ModelConfig(
    vocab_size=VOCAB, dim=256, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=False
)
STUDENT = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=1, n_heads=4, max_seq_len=64)


def student_grads(student: torch.nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    student.zero_grad()
    return grads


def main(out: Path, zero_stage: int) -> None:
    env = detect_environment()
    init_distributed(env, "gloo", timeout_s=120)  # a hang fails instead of waiting
    whole = build_model(TEACHER, "cpu", seed=5)
    student = build_model(STUDENT, "cpu", seed=7)
    settings = DistillConfig(teacher="unused", loss="jsd", kd_weight=0.7, chunk_tokens=24)
    reference = DistillObjective(settings, whole, SEQ)

    config = JobConfig(parallel=ParallelConfig(zero_stage=zero_stage, precision="fp32"))
    head = whole.output_weight.detach().clone()
    frozen = shard_frozen(copy.deepcopy(whole), config, 2, env.world_size, "test")
    local, full = partition_numels(frozen)
    sharded = DistillObjective(
        settings, frozen, SEQ, teacher_sha256=reference.teacher_sha256, teacher_head=head
    )

    # Documents (EOS = 0) so positions and masks restart inside rows; a batch per rank.
    generator = torch.Generator().manual_seed(100 + env.rank)
    rows = torch.randint(1, VOCAB, (2, SEQ + 1), generator=generator)
    rows[:, 9] = 0
    batch = causal_lm_batch(rows, eos_id=0, document_masking=True)
    units = batch.num_target_tokens
    # Preconditions of a meaningful comparison, checked here where they are built: documents
    # restart inside the rows, and the head is large enough (over DeepSpeed's persistence
    # threshold of 1e5 elements) to stay partitioned, so only the kept copy can serve the loss.
    assert batch.doc_ids is not None and int(batch.doc_ids.max()) > 0, "no document boundary"
    assert whole.output_weight.numel() > 100_000, "the head would not be partitioned"

    from_shards = sharded.train_step(student, batch, units)
    from_shards.loss.backward()
    grads_shards = student_grads(student)
    inner = getattr(frozen, "module", frozen)
    big = [p for p in inner.parameters() if getattr(p, "ds_numel", 0) > 100_000]
    released = bool(big) and all(p.data.numel() == 0 for p in big)
    from_whole = reference.train_step(student, batch, units)
    from_whole.loss.backward()
    grads_whole = student_grads(student)

    # Without the kept matrix the loss would read this rank's (empty) partition of the head.
    headless = DistillObjective(settings, frozen, SEQ, teacher_sha256=reference.teacher_sha256)
    try:
        headless.train_step(student, batch, units)
        headless_failed = False
    except (RuntimeError, ValueError):
        headless_failed = True

    result = {
        "sharded": is_sharded(frozen),
        "local": local,
        "full": full,
        "whole_numel": sum(p.numel() for p in whole.parameters()),
        "sha_sharded": sharded.teacher_sha256,
        "sha_whole": reference.teacher_sha256,
        "loss": float(from_whole.loss),
        "loss_gap": float((from_shards.loss - from_whole.loss).abs()),
        "kd_gap": abs(from_shards.metrics["kd_loss"].value - from_whole.metrics["kd_loss"].value),
        "grad_gap": max(
            float((a - b).abs().max()) for a, b in zip(grads_shards, grads_whole, strict=True)
        ),
        "big_released": released,
        "headless_failed": headless_failed,
    }
    (out / f"rank_{env.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
