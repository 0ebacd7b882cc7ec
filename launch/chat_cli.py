"""Talking to a fine-tuned checkpoint: `scaletrain generate CK --chat TEXT` and `scaletrain chat CK`.

Both render the conversation with the checkpoint's own chat template (chat_template.jinja, or
tokenizer_config.json's `chat_template`) with the generation prompt, generate, and stop at the
end of the assistant turn (the template's end-of-turn token, or any of the tokenizer's stop
ids); only the answer is printed. `chat` keeps the conversation and re-renders it whole each
turn; `/reset` starts over, `/exit` (or end of input) quits. Answers go to stdout, everything
else to stderr, so a piped session's stdout is the answers alone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from data_pipeline.chat import ChatTemplate
    from trainer.inference import LoadedCheckpoint

RESET, EXIT = "/reset", "/exit"


@dataclass
class ChatModel:
    """A checkpoint's model, its chat template and the ids that end an answer."""

    loaded: LoadedCheckpoint
    template: ChatTemplate
    stop_ids: list[int]


def load_chat_model(checkpoint: str) -> ChatModel:
    """Load a checkpoint with its chat template; CheckpointError (one line) when it has none."""
    from data_pipeline.chat import ChatTemplate, chat_stop_ids, checkpoint_template
    from trainer.checkpointing.checkpoint import CheckpointError
    from trainer.inference import load_checkpoint_model

    loaded = load_checkpoint_model(checkpoint)
    source = checkpoint_template(loaded.folder)
    if source is None:
        raise CheckpointError(
            f"{loaded.folder}: the checkpoint has no chat template (no chat_template.jinja, no "
            "chat_template in tokenizer_config.json); use --prompt for plain text"
        )
    template = ChatTemplate(source, loaded.tokenizer, f"{loaded.folder} chat template")
    return ChatModel(loaded, template, chat_stop_ids(template))


def answer(
    chat: ChatModel,
    messages: list[dict[str, str]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """The assistant's next answer to `messages` (without the end-of-turn token)."""
    from data_pipeline.chat import MaskError
    from data_pipeline.errors import DataError
    from model.generation import generate

    try:
        prompt = chat.template.render_text(messages, add_generation_prompt=True)
    except MaskError as exc:  # the template's own raise_exception (e.g. roles out of order)
        raise DataError(str(exc)) from None
    ids = generate(
        chat.loaded.model,
        chat.loaded.tokenizer.encode(prompt),
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_ids=chat.stop_ids,
        seed=seed,
    )
    if ids and ids[-1] in chat.stop_ids:
        ids = ids[:-1]
    return chat.loaded.tokenizer.decode(ids)


def cmd_generate_chat(args: argparse.Namespace) -> int:
    """`generate CK --chat TEXT`: one user message, one answer."""
    chat = load_chat_model(args.checkpoint)
    messages = [{"role": "user", "content": args.chat}]
    print(answer(chat, messages, args.max_new_tokens, args.temperature, args.top_p, args.seed))
    return 0


def chat_session(
    chat: ChatModel, args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> None:
    """Read user turns from `stdin` until /exit or end of input; answer each on `stdout`."""
    interactive = stdin.isatty()
    messages: list[dict[str, str]] = []
    stderr.write(f"chatting with {chat.loaded.folder} ({RESET} starts over, {EXIT} quits)\n")
    while True:
        if interactive:
            stderr.write("you> ")
            stderr.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if text.strip() == EXIT:
            break
        if text.strip() == RESET:
            messages = []
            stderr.write("(conversation reset)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply = answer(chat, messages, args.max_new_tokens, args.temperature, args.top_p, args.seed)
        messages.append({"role": "assistant", "content": reply})
        stdout.write(reply + "\n")
        stdout.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    """`chat CK`: an interactive, multi-turn conversation."""
    chat = load_chat_model(args.checkpoint)
    chat_session(chat, args, sys.stdin, sys.stdout, sys.stderr)
    return 0


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-p, --seed (shared with `generate`)."""
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def register(subparsers: Any) -> None:
    """Add `chat` to the `scaletrain` subcommands."""
    chat = subparsers.add_parser(
        "chat",
        help="talk to a fine-tuned checkpoint (its chat template; /reset, /exit)",
        description="A multi-turn conversation on stdin/stdout with the checkpoint's chat "
        f"template. {RESET} starts over; {EXIT} or end of input quits.",
    )
    chat.add_argument(
        "checkpoint", help="checkpoint folder, or a run dir (uses its newest checkpoint)"
    )
    add_sampling_arguments(chat)
    chat.set_defaults(func=cmd_chat)
