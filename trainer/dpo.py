"""The `dpo` and `rm` stages: preference pairs on the one loop (`scaletrain dpo|rm CONFIG`).

Data: each source of `data.train` / `data.validation` is a JSON-lines file (or a folder of
them) of preference records (data_pipeline/preference.py: explicit, implicit or `hh`; set
`format:` on the source or let it be detected) or `builtin:stdlib-preference`. Records are
rendered with the run's chat template (`chat.template`), tokenised once, and served in a
seeded order per epoch.

Batch: the optimizer batch is train.global_batch_tokens // data.seq_len *sequences*, i.e.
half as many pairs (a pair is a chosen and a rejected sequence); a micro-batch of
`micro_batch_size` sequences holds micro_batch_size / 2 pairs, so the micro-batch must be
even. Which pairs make up step s does not depend on the world size.

DPO's reference (`dpo.reference`, default the starting checkpoint `model.init_from`) is a
frozen copy built like the policy, outside the policy's DeepSpeed engine and never
checkpointed: at ZeRO-3 sharded over the ranks by an inference-only engine of its own
(trainer/frozen.py), below ZeRO-3 whole on every rank. With LoRA and no explicit reference it
is the policy with its adapters switched off.
`dpo.precompute_reference` replaces it by cached log-probs (trainer/reference_cache.py).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.chat import (
    ChatTemplate,
    resize_token_embeddings,
)
from data_pipeline.config import ChatConfig, SFTConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.preference import (
    BUILTIN_PREFERENCE_SOURCES,
    PreferenceFormat,
    TokenizedPair,
    Truncation,
    collate_pairs,
    parse_records,
    read_jsonl,
    stdlib_preference_records,
    tokenize_examples,
)
from data_pipeline.sources import SkipCounter
from model import build_model
from model.lora import LoRAConfig, apply_lora
from model.reward import RewardModel
from model.transformer import Transformer
from trainer.chat_setup import grow_vocabulary, prepare_chat
from trainer.config_io import ConfigError
from trainer.distributed import barrier
from trainer.frozen import release_frozen, shard_frozen
from trainer.monitors import MONITOR_SECTION, MonitorConfig
from trainer.objectives.base import Objective
from trainer.objectives.preference import DPOObjective, RewardObjective
from trainer.objectives.preference_config import DPOConfig, RMConfig
from trainer.reference_cache import (
    ReferenceCache,
    ReferenceCacheKey,
    attach_reference_logps,
    compute_reference_logps,
    model_weights_sha256,
    text_sha256,
)
from trainer.setup import load_weights
from trainer.sft import SFTStageConfig
from trainer.stages import Stage, StageContext, register_stage

logger = logging.getLogger(__name__)

TEMPLATE = "chat_template"  # ctx.extras keys
TRAIN_PAIRS = "train_pairs"
REFERENCE = "reference"
REFERENCE_SHA = "reference_sha256"
ADAPTERS_OFF = "adapters_off_reference"
CACHED_LOGPS = "cached_reference_logps"
REFERENCE_CACHE_DIR = "reference_cache"  # under RUN_DIR


# ---------------------------------------------------------------------------- data
class _Renderer:
    """ChatRenderer over the run's ChatTemplate: render to text, then the tokenizer's ids."""

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        text = self.template.render_text(messages, add_generation_prompt)
        return list(self.template.tokenizer.encode(text))


def _source_records(
    source: SourceConfig, split: str, validation_percent: float, skips: SkipCounter
) -> Iterator[tuple[str, Any]]:
    rejected = BUILTIN_PREFERENCE_SOURCES.get(source.path)
    if rejected is not None:
        yield from stdlib_preference_records(split, validation_percent, rejected=rejected)
        return
    if source.path.startswith("builtin:"):
        raise DataError(
            f"{source.path}: not a preference source (use "
            f"{' or '.join(BUILTIN_PREFERENCE_SOURCES)}, or JSON-lines files)"
        )
    path = Path(source.path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.jsonl"))
    else:
        files = sorted(Path(p) for p in glob.glob(source.path))
    if not files:
        raise DataError(f"{source.path}: no such preference file (JSON lines)")
    for file in files:
        yield from read_jsonl(file, skips)


def _fingerprinted(records: Iterator[tuple[str, Any]], digest: Any) -> Iterator[tuple[str, Any]]:
    for where, record in records:
        digest.update(json.dumps(record, sort_keys=True).encode())
        yield where, record


@dataclass
class PairSet:
    """Tokenised pairs of one split and the SHA-256 of the records they came from."""

    pairs: list[TokenizedPair]
    data_fingerprint: str
    tokens_by_source: dict[str, int] = field(default_factory=dict)


def build_pairs(ctx: StageContext, split: str) -> PairSet:
    """Parse, render and tokenise every record of `data.train` (split "train") or
    `data.validation`; bad records are counted in the run's skip counter (train only)."""
    config = ctx.config
    data = config.data
    template = cast(ChatTemplate, ctx.extras[TEMPLATE])
    truncation = cast(SFTConfig, config.sections["sft"]).truncation
    skips = ctx.skips if split == "train" else SkipCounter(strict=data.strict)
    digest = hashlib.sha256()
    pairs: list[TokenizedPair] = []
    for source in data.train if split == "train" else data.validation:
        fmt = source.format if source.format in ("preference", "hh") else None
        if source.format is not None and fmt is None:
            raise ConfigError(
                f"data.{split}: {source.label}: format {source.format!r} is not a preference "
                "format (preference, hh)"
            )
        records = _fingerprinted(
            _source_records(source, split, data.builtin_validation_percent, skips), digest
        )
        examples = parse_records(records, skips, cast(PreferenceFormat | None, fmt))
        pairs += tokenize_examples(
            examples,
            _Renderer(template),
            data.seq_len,
            cast(Truncation, truncation),
            skips,
        )
    for index, pair in enumerate(pairs):
        pair.example_id = index
    if not pairs and split == "train":
        raise DataError(f"data.train: no usable preference pair (skipped: {dict(skips.counts)})")
    return PairSet(pairs, digest.hexdigest())


def _pad_id(ctx: StageContext) -> int:
    tokenizer = ctx.tokenizer
    return tokenizer.pad_id if tokenizer.pad_id >= 0 else max(tokenizer.eos_id, 0)


def pair_counts(ctx: StageContext) -> tuple[int, int]:
    """(pairs per optimizer step, pairs per micro-batch)."""
    sequences = ctx.config.global_batch_seqs
    if sequences % 2 or ctx.micro_batch_size % 2:
        raise ConfigError(
            f"train.micro_batch_size: preference micro-batches hold pairs (2 sequences each); "
            f"{ctx.micro_batch_size} sequences per micro-batch and {sequences} per step must "
            "both be even"
        )
    return sequences // 2, ctx.micro_batch_size // 2


class PairLoader:
    """The loop's TrainLoader over a fixed set of pairs.

    The pairs form one stream: epoch e is a permutation seeded by (data.shuffle_seed, e),
    step s takes the stream's pairs [s * P, (s + 1) * P) and rank r its r-th share of them,
    in micro-batches. Only the step is state, so a resume on any world size continues alike;
    token counts are over the whole global batch (the same on every rank).
    """

    counts_are_local = False

    def __init__(
        self,
        pairs: list[TokenizedPair],
        pairs_per_step: int,
        pairs_per_micro: int,
        rank: int,
        world_size: int,
        seed: int,
        pad_id: int,
        cached: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if pairs_per_step % world_size:
            raise ConfigError(
                f"train.global_batch_tokens: {pairs_per_step} pairs per step do not split "
                f"over {world_size} ranks"
            )
        self.pairs = pairs
        self.pairs_per_step = pairs_per_step
        self.pairs_per_micro = pairs_per_micro
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.pad_id = pad_id
        self.cached = cached
        self.step = 0
        self.tokens = 0
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.pairs), generator=generator).tolist()}
        return self._orders[epoch]

    def global_pairs(self, step: int) -> list[TokenizedPair]:
        """The pairs of optimizer step `step` (all ranks)."""
        n = len(self.pairs)
        first = step * self.pairs_per_step
        return [
            self.pairs[self._order(k // n)[k % n]]
            for k in range(first, first + self.pairs_per_step)
        ]

    def next_step(self) -> list[Batch]:
        whole = self.global_pairs(self.step)
        self.step += 1
        self.tokens += sum(len(p.chosen_ids) + len(p.rejected_ids) - 2 for p in whole)
        per_rank = self.pairs_per_step // self.world_size
        mine = whole[self.rank * per_rank : (self.rank + 1) * per_rank]
        batches = []
        for start in range(0, per_rank, self.pairs_per_micro):
            batch = collate_pairs(mine[start : start + self.pairs_per_micro], self.pad_id)
            if self.cached is not None:
                batch = attach_reference_logps(batch, *self.cached)
            batches.append(batch)
        return batches

    def state_dict(self, gather: Any = None) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens = int(state.get("tokens", 0))

    def tokens_by_source(self) -> dict[str, int]:
        return {"preference": self.tokens}

    def close(self) -> None:
        pass


def _loader(ctx: StageContext) -> PairLoader:
    per_step, per_micro = pair_counts(ctx)
    return PairLoader(
        ctx.extras[TRAIN_PAIRS].pairs,
        per_step,
        per_micro,
        ctx.env.rank,
        ctx.env.world_size,
        ctx.config.data.shuffle_seed,
        _pad_id(ctx),
        ctx.extras.get(CACHED_LOGPS),
    )


def _eval_sets(ctx: StageContext) -> dict[str, list[Batch]]:
    """This rank's share of the held-out pairs (at most train.eval_batches micro-batches)."""
    if not ctx.config.data.validation:
        return {}
    pairs = build_pairs(ctx, "validation").pairs
    _, per_micro = pair_counts(ctx)
    world = ctx.env.world_size
    pairs = pairs[: ctx.config.train.eval_batches * per_micro * world]
    per_rank = len(pairs) // world
    if per_rank == 0:
        raise DataError(f"data.validation: {len(pairs)} preference pairs for {world} ranks")
    mine = pairs[ctx.env.rank * per_rank : (ctx.env.rank + 1) * per_rank]
    batches = [
        collate_pairs(mine[i : i + per_micro], _pad_id(ctx)) for i in range(0, per_rank, per_micro)
    ]
    return {"preference": batches}


# ---------------------------------------------------------------------------- setup
def _prepare(ctx: StageContext) -> None:
    """The chat template (and its added tokens) as the run's tokenizer; the training pairs."""
    config = ctx.config
    ctx.extras[TEMPLATE] = prepare_chat(ctx, cast(ChatConfig, config.sections["chat"]))
    ctx.extras[TRAIN_PAIRS] = build_pairs(ctx, "train")


def _grow_vocabulary(ctx: StageContext, model: Transformer) -> None:
    """The reference's rows, grown like the policy's (silently: the policy's line said so)."""
    resize_token_embeddings(model, ctx.tokenizer.vocab_size)


def _lora(ctx: StageContext) -> LoRAConfig:
    return cast(LoRAConfig, ctx.config.sections["lora"])


def _build_reference(
    ctx: StageContext, policy: Transformer, source: str | None, source_vocab: int
) -> Transformer:
    """The frozen reference: a copy of the starting policy, or `source`'s weights (a network
    of the policy's shape, at the starting vocabulary, grown like the policy)."""
    if source is None:
        reference = copy.deepcopy(policy)
    else:
        shape = dataclasses.replace(policy.config, vocab_size=source_vocab)
        reference = build_model(shape, ctx.device, seed=ctx.config.run.seed)
        try:
            load_weights(reference, source)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("model.init_from", "dpo.reference")) from None
        _grow_vocabulary(ctx, reference)
    reference.requires_grad_(False)
    return reference.eval()


def _cache_key(ctx: StageContext, reference_sha: str) -> ReferenceCacheKey:
    template = cast(ChatTemplate, ctx.extras[TEMPLATE])
    return ReferenceCacheKey(
        reference_sha256=reference_sha,
        tokenizer_sha256=ctx.tokenizer.sha256,
        chat_template_sha256=text_sha256(template.source),
        data_fingerprint=ctx.extras[TRAIN_PAIRS].data_fingerprint,
        truncation=cast(SFTConfig, ctx.config.sections["sft"]).truncation,
        seq_len=ctx.config.data.seq_len,
        dtype="float32",
    )


class PairMicroBatches:
    """The training pairs' micro-batches in dataset order, collated (on `device`) when indexed."""

    def __init__(
        self, pairs: list[TokenizedPair], per_micro: int, pad_id: int, device: torch.device
    ) -> None:
        self.pairs, self.per_micro, self.pad_id, self.device = pairs, per_micro, pad_id, device

    def __len__(self) -> int:
        return -(-len(self.pairs) // self.per_micro)

    def __getitem__(self, index: int) -> Batch:
        start = index * self.per_micro
        return collate_pairs(self.pairs[start : start + self.per_micro], self.pad_id).to(
            self.device
        )


def _precompute(
    ctx: StageContext, reference: nn.Module, reference_sha: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference log-probs of every training pair: from the run's cache when its key
    matches, else computed (the micro-batches shared out over the ranks) and written by rank 0."""
    cache = ReferenceCache(ctx.run_dir / REFERENCE_CACHE_DIR)
    key = _cache_key(ctx, reference_sha)
    loaded = cache.load(key)
    if loaded is not None:
        logger.info("dpo: reference log-probs from %s", cache.path)
        return loaded
    pairs = ctx.extras[TRAIN_PAIRS].pairs
    _, per_micro = pair_counts(ctx)
    batches = PairMicroBatches(pairs, per_micro, _pad_id(ctx), ctx.device)
    chosen, rejected = compute_reference_logps(reference, batches, len(pairs), ctx.device)
    if ctx.env.is_main:
        cache.save(key, chosen, rejected)
        logger.info("dpo: reference log-probs of %d pairs cached in %s", len(pairs), cache.path)
    barrier()
    return chosen, rejected


def _prepare_dpo_model(ctx: StageContext, model: nn.Module) -> nn.Module:
    policy = cast(Transformer, model)
    source_vocab = policy.config.require_vocab()
    grow_vocabulary(ctx, policy)
    dpo = cast(DPOConfig, ctx.config.sections["dpo"])
    lora = _lora(ctx)
    if dpo.uses_reference:
        adapters_off = lora.enabled and dpo.reference is None
        if adapters_off and not dpo.precompute_reference:
            # The policy's starting weights are the reference; its adapters go off for it.
            ctx.extras[REFERENCE_SHA] = model_weights_sha256(policy)
            ctx.extras[ADAPTERS_OFF] = True
        else:
            reference = _build_reference(ctx, policy, dpo.reference, source_vocab)
            sha = model_weights_sha256(reference)  # the whole weights, before any sharding
            ctx.extras[REFERENCE_SHA] = sha
            # At ZeRO-3 partitioned over the ranks like the policy (trainer/frozen.py).
            frozen = shard_frozen(
                reference,
                ctx.config,
                ctx.micro_batch_size,
                ctx.env.world_size,
                name="dpo: reference",
            )
            del reference  # at ZeRO-3 only its partitions are held from here on
            if dpo.precompute_reference:
                ctx.extras[CACHED_LOGPS] = _precompute(ctx, frozen, sha)
                release_frozen(frozen)
                del frozen  # not held during training
            else:
                ctx.extras[REFERENCE] = frozen
    return apply_lora(policy, lora, seed=ctx.config.run.seed)


def _dpo_objective(ctx: StageContext) -> Objective:
    config = ctx.config
    return DPOObjective(
        cast(DPOConfig, config.sections["dpo"]),
        reference=ctx.extras.get(REFERENCE),
        seq_len=config.data.seq_len,
        reference_sha256=ctx.extras.get(REFERENCE_SHA),
        adapters_off_reference=bool(ctx.extras.get(ADAPTERS_OFF)),
    )


def _prepare_rm_model(ctx: StageContext, model: nn.Module) -> nn.Module:
    backbone = cast(Transformer, model)
    grow_vocabulary(ctx, backbone)
    apply_lora(backbone, _lora(ctx), seed=ctx.config.run.seed)
    reward = RewardModel(backbone).to(next(backbone.parameters()).device)
    generator_state = torch.get_rng_state()
    torch.manual_seed(ctx.config.run.seed)  # the head's init does not depend on what ran before
    reward.init_score()
    torch.set_rng_state(generator_state)
    # The end-of-run text sample needs a language model; a reward model has no vocabulary head.
    ctx.config.train.sample_prompt = None
    return reward


def _rm_objective(ctx: StageContext) -> Objective:
    config = ctx.config
    return RewardObjective(cast(RMConfig, config.sections["rm"]), seq_len=config.data.seq_len)


DPO = Stage(
    name="dpo",
    build_objective=_dpo_objective,
    build_loader=_loader,
    build_eval_sets=_eval_sets,
    sections={
        "dpo": DPOConfig,
        "chat": ChatConfig,
        "sft": SFTStageConfig,  # data keys, and sample_chat for the end-of-run chat turn
        "lora": LoRAConfig,
        MONITOR_SECTION: MonitorConfig,  # forgetting / diversity hooks (trainer/monitors.py)
    },
    prepare=_prepare,
    prepare_model=_prepare_dpo_model,
)
RM = Stage(
    name="rm",
    build_objective=_rm_objective,
    build_loader=_loader,
    build_eval_sets=_eval_sets,
    sections={"rm": RMConfig, "chat": ChatConfig, "sft": SFTConfig, "lora": LoRAConfig},
    prepare=_prepare,
    prepare_model=_prepare_rm_model,
)
register_stage(DPO)
register_stage(RM)
