"""What every chat stage (sft, dpo, rm) sets up first: the template, its tokens, and the rows.

`prepare_chat` loads the chat template (the checkpoint's own, an HF folder's, or a built-in
one with its special tokens added to our tokenizer), makes the grown tokenizer the stage's, and
writes both under RUN_DIR/tokenizer, which the checkpoint manager copies into every checkpoint.
`grow_vocabulary` then adds the embedding rows of added tokens to a model, at the mean.
"""

from __future__ import annotations

import logging

from data_pipeline.chat import (
    CHAT_TEMPLATE_FILE,
    ChatTemplate,
    load_chat_template,
    resize_token_embeddings,
)
from data_pipeline.config import ChatConfig
from model.transformer import Transformer
from trainer.distributed import barrier
from trainer.setup import init_from_folder
from trainer.stages import StageContext

logger = logging.getLogger(__name__)


def prepare_chat(ctx: StageContext, chat: ChatConfig) -> ChatTemplate:
    """The stage's chat template; `ctx.tokenizer` becomes the tokenizer with its tokens, and
    both are saved for the checkpoints (rank 0 writes, every rank waits)."""
    config = ctx.config
    folder = init_from_folder(config.model.init_from) if config.model.init_from else None
    template, tokenizer, _ = load_chat_template(chat, ctx.tokenizer, folder)
    ctx.tokenizer = tokenizer
    if ctx.env.is_main:
        target = ctx.run_dir / "tokenizer"
        tokenizer.save(target)
        (target / CHAT_TEMPLATE_FILE).write_text(template.source, encoding="utf-8")
    barrier()
    return template


def grow_vocabulary(ctx: StageContext, model: Transformer) -> list[int]:
    """Embedding (and output) rows for the tokens the chat template added, initialised at the
    mean of the existing rows; one log line when there are any. Returns the new ids."""
    grown = resize_token_embeddings(model, ctx.tokenizer.vocab_size)
    if grown:
        logger.info(
            "embeddings: %d rows added for the chat tokens (ids %d..%d), initialised at the mean",
            len(grown),
            grown[0],
            grown[-1],
        )
    return grown
