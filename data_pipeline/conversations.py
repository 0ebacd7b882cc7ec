"""Supervised fine-tuning data: conversation records -> tokens with loss masks -> packed or
padded rows -> the micro-batches of every global batch, epoch after epoch.

Record formats (`format:` on a source, else detected from the fields):
- `messages`: {"messages": [{"role", "content"}, ...]} (UltraChat / Tulu 3),
- `prompt_completion`: {"prompt", "completion"}, each a string or a list of messages,
- `sharegpt`: {"conversations": [{"from", "value"}, ...]} with human/gpt/system roles,
- `text`: {"text"} (or a plain-text file): every token is trained.
Bad records are counted by reason (or stop a strict run with `file:line: reason`).

The dataset is finite and held in memory as token lists; each epoch has its own seeded
order, and rows and global batches depend only on (data, seed, epoch), never on the world
size, so a data position (epoch, step in epoch) resumes exactly on any number of ranks.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from data_pipeline.batch import IGNORE_INDEX, Batch
from data_pipeline.chat import ChatTemplate, MaskError, TokenizedConversation
from data_pipeline.config import SFTConfig, SourceConfig
from data_pipeline.sources import SkipCounter, iter_record_outcomes

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """Why a record cannot be trained on (the reason counted in the skip counters)."""


def detect_format(record: dict[str, Any], text_field: str = "text") -> str:
    """The record format its fields imply."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if text_field in record:
        return "text"
    raise RecordError("no messages, conversations, prompt/completion or text field")


def _checked_messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError(f"field '{field}' is not a list of messages")
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise RecordError(f"field '{field}' holds a message that is not an object")
        role = message.get("role")
        if role is None:
            raise RecordError("message without a role")
        if role not in ROLES:
            raise RecordError(f"unknown role {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RecordError("message content is not a string")
        messages.append({"role": role, "content": content})
    return messages


def record_messages(
    record: dict[str, Any], format: str | None = None, text_field: str = "text"
) -> list[dict[str, str]]:
    """The conversation of a record as [{role, content}]; RecordError names what is wrong.

    A `text` record (its `text_field`) comes back as one message of role "text", trained on
    every token.
    """
    format = format or detect_format(record, text_field)
    if format == "text":
        text = record.get(text_field)
        if not isinstance(text, str):
            raise RecordError(f"field '{text_field}' is missing or not a string")
        if not text.strip():
            raise RecordError("empty document")
        return [{"role": "text", "content": text}]
    if format == "messages":
        messages = _checked_messages(record.get("messages"), "messages")
    elif format == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise RecordError("field 'conversations' is not a list of turns")
        converted = []
        for turn in turns:
            if not isinstance(turn, dict):
                raise RecordError("field 'conversations' holds a turn that is not an object")
            speaker = turn.get("from")
            if speaker is None:
                raise RecordError("message without a role")
            if speaker not in SHAREGPT_ROLES:
                raise RecordError(f"unknown role {speaker!r}")
            converted.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
        messages = _checked_messages(converted, "conversations")
    elif format == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if prompt is None or completion is None:
            raise RecordError("prompt_completion record needs both 'prompt' and 'completion'")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        messages = _checked_messages(prompt, "prompt") + _checked_messages(completion, "completion")
    else:
        raise RecordError(f"unknown format {format!r}")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise RecordError("no assistant turn")
    if any(not m["content"].strip() for m in assistant):
        raise RecordError("empty assistant turn")
    return messages


def tokenize_record(
    messages: list[dict[str, str]],
    template: ChatTemplate,
    train_on: str,
    where: str = "",
) -> TokenizedConversation:
    """Tokens and loss mask of a parsed record (a `text` record: BOS? + text + EOS, all trained)."""
    if messages and messages[0]["role"] == "text":
        tokenizer = template.tokenizer
        ids = tokenizer.encode(messages[0]["content"])
        if tokenizer.bos_id >= 0:
            ids = [tokenizer.bos_id, *ids]
        if tokenizer.eos_id >= 0:
            ids.append(tokenizer.eos_id)
        return TokenizedConversation(ids, [False] + [True] * (len(ids) - 1), where)
    return template.tokenize(messages, train_on, where)


def fit_to_length(
    conversation: TokenizedConversation, seq_len: int, truncation: str
) -> TokenizedConversation | None:
    """`conversation` if it fits `seq_len`; else by `truncation`: `error` raises RecordError,
    `drop` returns None, `truncate` keeps the first seq_len tokens (the prompt, and as much of
    the response as fits) and returns None if no trained token is left."""
    if len(conversation) <= seq_len:
        return conversation
    if truncation == "error":
        raise RecordError(f"conversation of {len(conversation)} tokens exceeds data.seq_len")
    if truncation == "drop":
        return None
    cut = TokenizedConversation(
        conversation.ids[:seq_len], conversation.trained[:seq_len], conversation.where
    )
    return cut if cut.num_trained else None


@dataclass
class SFTDataset:
    """The tokenized conversations of a split, in source order.

    `source_of[i]` is the index (in `weights`) of the source conversation i came from; the
    weights say how many times per epoch each source is seen (see `epoch_order`). Empty:
    one source of weight 1.
    """

    conversations: list[TokenizedConversation]
    skips: SkipCounter
    source_of: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.conversations)


def build_sft_dataset(
    sources: Sequence[SourceConfig],
    split: str,
    template: ChatTemplate,
    config: SFTConfig,
    seq_len: int,
    strict: bool = False,
    validation_percent: float = 2.0,
) -> SFTDataset:
    """Read, check and tokenize every record of `sources` (bad ones counted or raised)."""
    skips = SkipCounter(strict)
    conversations = []
    source_of = []
    for source_index, source in enumerate(sources):
        for where, record in iter_record_outcomes(
            source, split, skips, validation_percent=validation_percent
        ):
            if record is None:
                continue  # already counted (malformed JSON, unreadable file, ...)
            try:
                messages = record_messages(record, source.format, source.text_field)
                tokens = tokenize_record(messages, template, config.train_on, where)
                fitted = fit_to_length(tokens, seq_len, config.truncation)
            except (RecordError, MaskError) as exc:
                skips.skip(where, str(exc))
                continue
            if fitted is None:
                skips.drop(f"{config.truncation}: longer than data.seq_len")
                continue
            conversations.append(fitted)
            source_of.append(source_index)
    if skips.total():
        logger.warning(
            "sft %s data: %d records skipped (%s)",
            split,
            skips.total(),
            ", ".join(f"{reason}: {n}" for reason, n in sorted(skips.counts.items())),
        )
    return SFTDataset(conversations, skips, source_of, [s.weight for s in sources])


def pack_best_fit(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Rows of item indices by best-fit decreasing: longest first, each into the row with the
    least room that still fits it (ties: the earliest row). Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # Open rows sorted by (room left, row index): bisect finds the tightest fit.
    rooms: list[tuple[int, int]] = []
    for item in order:
        length = lengths[item]
        if length > seq_len:
            raise ValueError(f"item of {length} tokens does not fit a row of {seq_len}")
        slot = bisect.bisect_left(rooms, (length, -1))
        if slot < len(rooms):
            room, row = rooms.pop(slot)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(item)
        if room - length > 0:
            bisect.insort(rooms, (room - length, row))
    return rows


def epoch_order(
    source_of: Sequence[int], weights: Sequence[float], rng: random.Random
) -> list[int]:
    """The conversations of one epoch, shuffled: a source of weight w is seen w times per
    epoch, its integer part as whole copies and its fraction as a sample drawn anew each epoch
    (weight 2: twice; 0.25: a different quarter each epoch)."""
    members: dict[int, list[int]] = {}
    for index, source in enumerate(source_of):
        members.setdefault(source, []).append(index)
    order: list[int] = []
    for source, indices in sorted(members.items()):
        weight = weights[source]
        copies = int(weight)
        order.extend(indices * copies)
        extra = round((weight - copies) * len(indices))
        order.extend(sorted(rng.sample(indices, extra)))
    rng.shuffle(order)
    return order


def epoch_rows(
    lengths: Sequence[int],
    seq_len: int,
    seed: int,
    epoch: int,
    packing: bool,
    buffer: int,
    source_of: Sequence[int] = (),
    weights: Sequence[float] = (),
) -> list[list[int]]:
    """The rows of an epoch as lists of conversation indices.

    Conversations are drawn by `epoch_order` (each once when no sources/weights are given) and
    shuffled with (seed, epoch); with packing, each run of `buffer` of them is packed by
    best-fit decreasing and its rows shuffled, so long and short rows mix."""
    rng = random.Random(f"sft:{seed}:{epoch}")
    if source_of:
        order = epoch_order(source_of, weights, rng)
    else:
        order = list(range(len(lengths)))
        rng.shuffle(order)
    if not packing:
        return [[i] for i in order]
    rows: list[list[int]] = []
    for start in range(0, len(order), buffer):
        chunk = order[start : start + buffer]
        packed = [
            [chunk[i] for i in row] for row in pack_best_fit([lengths[i] for i in chunk], seq_len)
        ]
        rng.shuffle(packed)
        rows.extend(packed)
    return rows


def rows_to_batch(
    conversations: Sequence[TokenizedConversation],
    rows: Sequence[Sequence[int]],
    row_len: int | None,
    pad_id: int,
    packed: bool,
) -> Batch:
    """A Batch of `rows` (each a list of conversation indices).

    Labels are aligned (label t = token t + 1 when that token is trained, else -100) and never
    cross a conversation. Packed rows get doc_ids (one per conversation; the padding tail has
    its own) and positions restarting per conversation; every row is padded to `row_len`
    (None: the longest row) with pad_mask True and label -100 there.
    """
    lengths = [sum(len(conversations[i]) for i in row) for row in rows]
    width = row_len or max(lengths)
    input_ids = torch.full((len(rows), width), max(pad_id, 0), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    pad_mask = torch.ones((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        offset = 0
        for doc, index in enumerate(row):
            conversation = conversations[index]
            n = len(conversation)
            ids = torch.tensor(conversation.ids, dtype=torch.long)
            targets = ids[1:].clone()
            targets[~torch.tensor(conversation.trained[1:], dtype=torch.bool)] = IGNORE_INDEX
            input_ids[r, offset : offset + n] = ids
            labels[r, offset : offset + n - 1] = targets
            doc_ids[r, offset : offset + n] = doc
            positions[r, offset : offset + n] = torch.arange(n)
            pad_mask[r, offset : offset + n] = False
            offset += n
        doc_ids[r, offset:] = len(row)
        positions[r, offset:] = torch.arange(width - offset)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        doc_ids=doc_ids if packed else None,
        positions=positions,
        pad_mask=pad_mask,
    )


class SFTLoader:
    """Each global batch (`global_batch_rows` rows) of every epoch, as this rank's micro-batches.

    Rank r of W takes rows [r * G / W, (r + 1) * G / W) of each global batch, cut into
    micro-batches of `micro_batch_rows`; so the global batch is the same on any world size.
    An epoch's incomplete last global batch is dropped. Training ends after `epochs` epochs
    or `max_steps` optimizer steps, whichever comes first (0: no limit by that one).
    The position (`state_dict`) is (epoch, step in epoch), independent of the world size.
    """

    def __init__(
        self,
        dataset: SFTDataset,
        seq_len: int,
        global_batch_rows: int,
        micro_batch_rows: int,
        pad_id: int,
        config: SFTConfig,
        seed: int = 0,
        epochs: int = 1,
        max_steps: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if global_batch_rows % world_size:
            raise ValueError(
                f"global batch of {global_batch_rows} rows does not split over {world_size} ranks"
            )
        if (global_batch_rows // world_size) % micro_batch_rows:
            raise ValueError(
                f"micro_batch_size: {micro_batch_rows} does not divide the "
                f"{global_batch_rows // world_size} rows of each rank"
            )
        if epochs <= 0 and max_steps <= 0:
            raise ValueError("epochs: set train.epochs or train.max_steps for a finite dataset")
        self.dataset = dataset
        self.seq_len = seq_len
        self.global_batch_rows = global_batch_rows
        self.micro_batch_rows = micro_batch_rows
        self.pad_id = pad_id
        self.config = config
        self.seed = seed
        self.epochs = epochs
        self.max_steps = max_steps
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.step_in_epoch = 0
        self.steps_done = 0
        self._rows: tuple[int, list[list[int]]] | None = None
        self._lengths = [len(c) for c in dataset.conversations]
        if self.steps_per_epoch(0) == 0:
            raise ValueError(
                f"the dataset gives fewer rows than one global batch ({global_batch_rows})"
            )

    def rows(self, epoch: int) -> list[list[int]]:
        """The rows of `epoch` (conversation indices), cached for the current epoch."""
        if self._rows is None or self._rows[0] != epoch:
            rows = epoch_rows(
                self._lengths,
                self.seq_len,
                self.seed,
                epoch,
                self.config.packing,
                self.config.pack_buffer,
                self.dataset.source_of,
                self.dataset.weights,
            )
            self._rows = (epoch, rows)
        return self._rows[1]

    def steps_per_epoch(self, epoch: int) -> int:
        """Complete global batches in `epoch`."""
        return len(self.rows(epoch)) // self.global_batch_rows

    def global_rows(self, epoch: int, step: int) -> list[list[int]]:
        """The rows of global batch `step` of `epoch`, all ranks together."""
        start = step * self.global_batch_rows
        return self.rows(epoch)[start : start + self.global_batch_rows]

    def micro_batches(self, epoch: int, step: int) -> list[Batch]:
        """This rank's micro-batches of global batch `step` of `epoch`."""
        per_rank = self.global_batch_rows // self.world_size
        mine = self.global_rows(epoch, step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        packed = self.config.packing
        return [
            rows_to_batch(
                self.dataset.conversations,
                mine[i : i + self.micro_batch_rows],
                self.seq_len if packed else None,
                self.pad_id,
                packed,
            )
            for i in range(0, per_rank, self.micro_batch_rows)
        ]

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            if self.max_steps and self.steps_done >= self.max_steps:
                return
            if self.step_in_epoch >= self.steps_per_epoch(self.epoch):
                self.epoch += 1
                self.step_in_epoch = 0
            if self.epochs and self.epoch >= self.epochs:
                return
            batches = self.micro_batches(self.epoch, self.step_in_epoch)
            self.step_in_epoch += 1
            self.steps_done += 1
            yield batches

    def state_dict(self) -> dict[str, int]:
        """The data position: the same on any world size."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "steps": self.steps_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by `state_dict` (on any world size)."""
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.steps_done = int(state["steps"])
