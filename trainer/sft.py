"""The `sft` stage: supervised fine-tuning of a checkpoint on conversations, on the one loop.

Registered at import (`scaletrain sft CONFIG`). Its sections are `sft` (which tokens carry the
loss, packing, truncation; plus the end-of-run chat sample), `chat` (the chat template) and
`lora` (rank 0: full fine-tuning). Setup, in the loop's order:

- `prepare`: the chat template (`chat.template`: `auto` = the `model.init_from` folder's own,
  `chatml`, or a .jinja path) bound to the run's tokenizer, with the chat tokens it needs added;
  the tokenizer and `chat_template.jinja` are saved into RUN_DIR/tokenizer, so every checkpoint
  carries them; the conversations are read and tokenized once (every rank reads them all).
- `prepare_model`: embedding rows for added tokens, then LoRA adapters (seeded by run.seed).
- objective: next-token cross-entropy over the trained (assistant) tokens, a sum over the step's
  tokens divided by their global count, with positions and document ids of packed rows.
- loader: `SFTLoader`'s global batches, epoch after epoch, until train.max_steps; the data
  position (epoch, step in epoch) does not depend on the world size.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.chat import (
    ChatTemplate,
    MaskError,
    checkpoint_template,
)
from data_pipeline.config import ChatConfig, SFTConfig
from data_pipeline.conversations import (
    SFTDataset,
    SFTLoader,
    build_sft_dataset,
    pack_best_fit,
    rows_to_batch,
)
from data_pipeline.errors import DataError
from model.lora import LoRAConfig, apply_lora, trainable_parameter_count
from model.transformer import Transformer
from trainer.chat_setup import grow_vocabulary, prepare_chat
from trainer.config_io import ConfigError
from trainer.hooks import Hook
from trainer.monitors import MONITOR_SECTION, MonitorConfig
from trainer.objectives.causal_lm import CausalLMObjective
from trainer.stages import Stage, StageContext, register_stage

if TYPE_CHECKING:
    from trainer.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class SFTStageConfig(SFTConfig):
    """`sft.*`: the data keys of `SFTConfig`, plus the chat turn sampled at the end of the run.

    `sample_chat` is a user message: rank 0 renders it with the run's template, greedily
    generates until the end of the assistant turn and prints the answer (None: no sample).
    """

    sample_chat: str | None = None
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sample_tokens <= 0:
            raise ValueError(f"sample_tokens: must be positive, got {self.sample_tokens}")


class SFTObjective(CausalLMObjective):
    """The causal-LM objective on SFT batches: labels are -100 outside the trained spans, so
    the unit is a trained token; packed rows pass their positions and document ids."""

    stage = "sft"


def end_of_turn_ids(template: ChatTemplate) -> list[int]:
    """The special token a template closes an assistant turn with (ChatML's <|im_end|>,
    Llama-3's <|eot_id|>), found by rendering a one-turn conversation; empty when it has none."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        tokens = template.tokenize(probe, "assistant")
    except MaskError:
        return []
    trained = [i for i, flag in zip(tokens.ids, tokens.trained, strict=True) if flag]
    special = set(template.tokenizer.special_ids())
    return trained[-1:] if trained and trained[-1] in special else []


# ---------------------------------------------------------------------------- setup steps
def _sections(ctx: StageContext) -> tuple[SFTStageConfig, ChatConfig, LoRAConfig]:
    sections = ctx.config.sections
    return (
        cast(SFTStageConfig, sections.get("sft", SFTStageConfig())),
        cast(ChatConfig, sections.get("chat", ChatConfig())),
        cast(LoRAConfig, sections.get("lora", LoRAConfig())),
    )


def _prepare(ctx: StageContext) -> None:
    """Chat template and tokens; save both for the checkpoints; read the conversations."""
    sft, chat, _ = _sections(ctx)
    config = ctx.config
    template = prepare_chat(ctx, chat)
    ctx.extras["chat_template"] = template
    data = config.data
    ctx.extras["sft_train"] = build_sft_dataset(
        data.train,
        "train",
        template,
        sft,
        data.seq_len,
        data.strict,
        data.builtin_validation_percent,
    )
    if not ctx.extras["sft_train"].conversations:
        raise DataError("data.train: no usable conversation (see the skipped-record counts)")


def _prepare_model(ctx: StageContext, model: nn.Module) -> nn.Module:
    """Rows for added chat tokens, then LoRA adapters (rank 0 of `lora`: full fine-tuning)."""
    _, _, lora = _sections(ctx)
    transformer = cast(Transformer, model)
    grow_vocabulary(ctx, transformer)
    if lora.enabled:
        apply_lora(transformer, lora, seed=ctx.config.run.seed)
        total = sum(p.numel() for p in transformer.parameters())
        logger.info(
            "lora: rank %d on %s; %s of %s parameters train",
            lora.rank,
            ", ".join(lora.targets),
            f"{trainable_parameter_count(transformer):,}",
            f"{total:,}",
        )
    return transformer


# ---------------------------------------------------------------------------- data
class SFTTrainLoader:
    """`SFTLoader` behind the loop's TrainLoader protocol.

    Every rank holds the whole (small, tokenized) dataset and computes the same global rows,
    so the position and the per-source token counts are global (`counts_are_local` False).
    Epochs follow each other until the loop's train.max_steps.
    """

    counts_are_local = False

    def __init__(self, ctx: StageContext, dataset: SFTDataset) -> None:
        sft, _, _ = _sections(ctx)
        config = ctx.config
        self.dataset = dataset
        self.labels = [s.label for s in config.data.train]
        try:
            self.loader = SFTLoader(
                dataset,
                config.data.seq_len,
                config.global_batch_seqs,
                ctx.micro_batch_size,
                ctx.tokenizer.pad_id,
                sft,
                seed=config.run.seed,
                epochs=0,  # the loop stops at train.max_steps
                max_steps=config.train.max_steps,
                rank=ctx.env.rank,
                world_size=ctx.env.world_size,
            )
        except ValueError as exc:
            raise DataError(f"data.train: {exc}") from None
        self.tokens = dict.fromkeys(self.labels, 0)
        # The records skipped while reading join the run's counters (metrics, the summary
        # line, checkpoints); a resumed run's saved counters hold them already.
        self.skips = ctx.skips
        self.skips.counts.update(dataset.skips.counts)
        if ctx.env.is_main:
            logger.info(
                "sft data: %d conversations, %d steps per epoch of %d rows; %d steps = %.2f epochs",
                len(dataset),
                self.loader.steps_per_epoch(0),
                config.global_batch_seqs,
                config.train.max_steps,
                config.train.max_steps / self.loader.steps_per_epoch(0),
            )

    def next_step(self) -> list[Batch]:
        loader = self.loader
        if loader.step_in_epoch >= loader.steps_per_epoch(loader.epoch):
            loader.epoch += 1
            loader.step_in_epoch = 0
        self._count(loader.global_rows(loader.epoch, loader.step_in_epoch))
        batches = loader.micro_batches(loader.epoch, loader.step_in_epoch)
        loader.step_in_epoch += 1
        loader.steps_done += 1
        return batches

    def _count(self, rows: list[list[int]]) -> None:
        """Tokens drawn per source over all ranks (every rank sees the same global rows)."""
        for row in rows:
            for index in row:
                label = self.labels[self.dataset.source_of[index]]
                self.tokens[label] += len(self.dataset.conversations[index])

    def state_dict(self, gather: Any = None) -> dict[str, Any]:
        """The global position (epoch, step in epoch) and tokens per source: no collective."""
        del gather  # every rank holds the same global state
        return {"sft": self.loader.state_dict(), "tokens_by_source": dict(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sft" not in state:
            raise DataError(
                "the checkpoint's data position is not an sft one; start a new run dir "
                "(model.init_from) to fine-tune a checkpoint of another stage"
            )
        self.loader.load_state_dict(state["sft"])
        # The loop adds the checkpoint's counters next, which include this dataset's skips.
        self.skips.counts.subtract(self.dataset.skips.counts)
        self.skips.counts += Counter()  # drops the reasons now at zero
        self.tokens.update(state.get("tokens_by_source", {}))

    def tokens_by_source(self) -> dict[str, int]:
        return dict(self.tokens)

    def close(self) -> None:
        """Nothing to stop: the data is in memory."""


def _build_loader(ctx: StageContext) -> SFTTrainLoader:
    return SFTTrainLoader(ctx, cast(SFTDataset, ctx.extras["sft_train"]))


def _build_eval_sets(ctx: StageContext) -> dict[str, list[Batch]]:
    """This rank's share of the held-out conversations of each data.validation source (for
    builtin:stdlib-instruct, its held-out files), as SFT rows: packed as training packs them."""
    sft, _, _ = _sections(ctx)
    config, env = ctx.config, ctx.env
    if config.train.eval_every <= 0:
        return {}
    template = cast(ChatTemplate, ctx.extras["chat_template"])
    wanted = config.train.eval_batches * ctx.micro_batch_size * env.world_size
    sets = {}
    for source in config.data.validation:
        dataset = build_sft_dataset(
            [source],
            "validation",
            template,
            sft,
            config.data.seq_len,
            config.data.strict,
            config.data.builtin_validation_percent,
        )
        lengths = [len(c) for c in dataset.conversations]
        if sft.packing:
            rows = pack_best_fit(lengths, config.data.seq_len)
            rows = sorted(rows, key=min)  # source order, independent of the packing's ranking
        else:
            rows = [[i] for i in range(len(lengths))]
        rows = rows[:wanted]
        if not rows:
            raise DataError(f"{source.path}: the validation split holds no usable conversation")
        per_rank = max(1, len(rows) // env.world_size)
        mine = rows[env.rank * per_rank : (env.rank + 1) * per_rank]
        sets[source.label] = [
            rows_to_batch(
                dataset.conversations,
                mine[i : i + ctx.micro_batch_size],
                config.data.seq_len if sft.packing else None,
                ctx.tokenizer.pad_id,
                sft.packing,
            )
            for i in range(0, len(mine), ctx.micro_batch_size)
        ]
    return sets


def _build_objective(ctx: StageContext) -> SFTObjective:
    return SFTObjective(ctx.config.data.seq_len)


# ---------------------------------------------------------------------------- end-of-run sample
class ChatSample(Hook):
    """Rank 0 answers `sft.sample_chat` with the final checkpoint (sft and dpo runs): the user
    turn rendered with the checkpoint's chat template, greedy, stopped at the end of the
    assistant turn."""

    name = "chat_sample"

    def on_train_end(self, trainer: Trainer) -> None:
        sft = trainer.config.sections.get("sft")
        prompt = getattr(sft, "sample_chat", None)
        if not (trainer.env.is_main and prompt) or trainer.preempted:
            return
        from model.generation import generate
        from trainer.inference import load_checkpoint_model

        loaded = load_checkpoint_model(str(trainer.checkpoint_root))
        source = checkpoint_template(loaded.folder)
        if source is None:
            raise ConfigError(f"{loaded.folder}: the checkpoint carries no chat template")
        template = ChatTemplate(source, loaded.tokenizer)
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = loaded.tokenizer.encode(template.render_text(messages, True))
        stop_ids = [*loaded.tokenizer.stop_ids, *end_of_turn_ids(template)]
        ids = generate(
            loaded.model, prompt_ids, cast(SFTStageConfig, sft).sample_tokens, 0.0, 1.0, stop_ids
        )
        answer = loaded.tokenizer.decode([i for i in ids if i not in stop_ids])
        print(f"--- chat sample ({loaded.folder.name}, greedy) ---")
        print(f"user: {prompt}")
        print(f"assistant: {answer}")
        print("---")


SFT = Stage(
    name="sft",
    build_objective=_build_objective,
    build_loader=_build_loader,
    build_eval_sets=_build_eval_sets,
    sections={
        "sft": SFTStageConfig,
        "chat": ChatConfig,
        "lora": LoRAConfig,
        MONITOR_SECTION: MonitorConfig,  # forgetting / diversity hooks (trainer/monitors.py)
    },
    prepare=_prepare,
    prepare_model=_prepare_model,
)
register_stage(SFT)
