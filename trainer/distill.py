"""`scaletrain distill CONFIG`: knowledge distillation as a stage on the one loop.

The student is the run's model (its own `model` section, or `model.init_from`); the teacher is
`distill.teacher`, built from its own config (its shape may differ), frozen and in eval mode:
below ZeRO-3 a whole replica on every rank; at ZeRO-3 sharded over the ranks like the student
(an inference-only DeepSpeed engine, trainer/frozen.py), except its output matrix, which the
chunked loss reads outside the teacher's forward and every rank keeps whole. It gets no
optimizer state and is never written into checkpoints (its SHA-256, taken before sharding, is,
and a resume checks it). Data, loader and evaluation are pretraining's: packed documents from
`data.train`, the student's eval_loss on `data.validation`.
"""

from __future__ import annotations

import logging

import torch

from data_pipeline.tokenizer import Tokenizer
from model import build_model
from model.transformer import Transformer
from trainer.checkpointing import checkpoint as ckpt
from trainer.config_io import ConfigError
from trainer.frozen import shard_frozen, shards
from trainer.init_from import source_model_config
from trainer.objectives.distill import DistillConfig, DistillObjective
from trainer.reference_cache import model_weights_sha256
from trainer.setup import init_from_folder, load_weights
from trainer.stages import (
    Stage,
    StageContext,
    pretrain_eval_sets,
    pretrain_loader,
    register_stage,
)

logger = logging.getLogger(__name__)

SECTION = "distill"
_TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _as_teacher_error(exc: ConfigError) -> ConfigError:
    """The init_from readers' message, said of `distill.teacher`."""
    return ConfigError(f"{SECTION}.teacher: {str(exc).removeprefix('model.init_from: ')}")


def distill_config(ctx: StageContext) -> DistillConfig:
    """The run's `distill` section, with the teacher required."""
    config: DistillConfig = ctx.config.sections[SECTION]
    if not config.teacher:
        raise ConfigError(
            f"{SECTION}.teacher: required (a checkpoint folder, a run dir or hf:DIR to learn from)"
        )
    return config


def tokenizer_difference(teacher: Tokenizer, student: Tokenizer) -> str | None:
    """Why two tokenizers do not give the same ids (None when they do): a different vocabulary
    size, or the first id whose piece differs."""
    if teacher.sha256 == student.sha256:
        return None
    if teacher.vocab_size != student.vocab_size:
        return f"{teacher.vocab_size} pieces, the run's has {student.vocab_size}"
    for token_id in range(teacher.vocab_size):
        ours, theirs = student.id_to_token(token_id), teacher.id_to_token(token_id)
        if ours != theirs:
            return f"id {token_id} is {theirs!r}, the run's is {ours!r}"
    return None


def check_teacher_tokenizer(ctx: StageContext) -> None:
    """`prepare`: refuse a teacher whose tokenizer is not the run's, before anything is built."""
    source = str(distill_config(ctx).teacher)
    try:
        folder = init_from_folder(source)
    except ConfigError as exc:
        raise _as_teacher_error(exc) from None
    if folder is None or not Tokenizer.found_in(folder):
        raise ConfigError(
            f"{SECTION}.teacher: {source} has no tokenizer to compare with the run's; "
            "distillation needs one tokenizer"
        )
    difference = tokenizer_difference(Tokenizer.load(folder), ctx.tokenizer)
    if difference is not None:
        raise ConfigError(
            f"{SECTION}.teacher: {source} has another tokenizer ({difference}); "
            "distillation needs the student and teacher on one tokenizer"
        )


def load_teacher(source: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The teacher network from its own config and weights, frozen and in eval mode."""
    try:
        config = source_model_config(source)
        if not source.startswith("hf:"):
            folder = init_from_folder(source)
            if folder is not None:
                ckpt.verify_checkpoint(folder)
        teacher = build_model(config, device)
        load_weights(teacher, source)
    except ConfigError as exc:
        raise _as_teacher_error(exc) from None
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"{SECTION}.teacher: {exc}") from None
    return teacher.to(dtype).requires_grad_(False).eval()


def build_distill_objective(ctx: StageContext) -> DistillObjective:
    """The teacher, checked against the student, and the objective around it."""
    config = distill_config(ctx)
    source = str(config.teacher)
    # The teacher computes in the student's precision: half the memory under bf16.
    dtype = _TEACHER_DTYPES.get(ctx.config.parallel.precision, torch.float32)
    teacher = load_teacher(source, ctx.device, dtype)
    student_vocab = ctx.config.model.require_vocab()
    if teacher.config.require_vocab() != student_vocab:
        raise ConfigError(
            f"{SECTION}.teacher: {source} has {teacher.config.require_vocab()} output rows, the "
            f"student {student_vocab}; set model.vocab_size to match"
        )
    seq_len = ctx.config.data.seq_len
    if teacher.config.max_seq_len < seq_len:
        raise ConfigError(
            f"{SECTION}.teacher: {source} takes at most {teacher.config.max_seq_len} tokens, "
            f"data.seq_len is {seq_len}"
        )
    sha256 = model_weights_sha256(teacher)  # whole: afterwards a rank may hold a partition
    head = None
    if shards(ctx.config):  # the chunked loss reads it outside the teacher's forward
        head = teacher.output_weight.detach().clone()
        logger.info("distill: the teacher's output matrix (%d elements) stays whole", head.numel())
    frozen = shard_frozen(
        teacher, ctx.config, ctx.micro_batch_size, ctx.env.world_size, name="distill: teacher"
    )
    return DistillObjective(config, frozen, seq_len, teacher_sha256=sha256, teacher_head=head)


DISTILL = Stage(
    name="distill",
    build_objective=build_distill_objective,
    build_loader=pretrain_loader,
    build_eval_sets=pretrain_eval_sets,
    sections={SECTION: DistillConfig},
    prepare=check_teacher_tokenizer,
)
register_stage(DISTILL)
