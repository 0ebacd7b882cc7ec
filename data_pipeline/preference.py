"""Preference data: records -> (prompt, chosen, rejected[, margin]) -> tokenised pairs -> Batch.

Record formats (`format` of a source; auto-detected from the fields when absent):
- `preference`, explicit: `prompt`, `chosen`, `rejected`, each a string or a message list
  (a string prompt is one user turn, a string completion one assistant turn);
- `preference`, implicit: `chosen` and `rejected` full conversations; the prompt is their
  common prefix of messages (UltraFeedback-binarized also has `prompt`, the first user turn,
  and `score_chosen` / `score_rejected`, whose difference becomes the pair's margin);
- `hh`: Anthropic-HH strings "\\n\\nHuman: ...\\n\\nAssistant: ..." for chosen and rejected.
A numeric `margin` field gives the margin directly.

Tokenisation renders the prompt with the generation prompt, and prompt + completion without;
the completion's tokens are those after the prompt's rendering, which must be a prefix of the
full rendering (a template that renders an assistant turn differently once it is complete,
e.g. by stripping reasoning, breaks this; such pairs are skipped and counted).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from data_pipeline.batch import IGNORE_INDEX, Batch
from data_pipeline.sources import SkipCounter

Message = dict[str, str]
PreferenceFormat = Literal["preference", "hh"]
Truncation = Literal["error", "drop", "truncate"]
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason counted by SkipCounter."""


@dataclass
class PreferenceExample:
    """One parsed preference record: a shared prompt and two completions (message lists)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None


class ChatRenderer(Protocol):
    """Renders messages to token ids with a chat template (data_pipeline/chat.py provides one;
    tests use a tokenizer's `apply_chat_template`)."""

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[int]: ...


# ---------------------------------------------------------------------------- parsing
def detect_format(record: dict[str, Any]) -> PreferenceFormat:
    """`hh` when chosen is an Anthropic-HH transcript string, else `preference`."""
    chosen = record.get("chosen")
    if "prompt" not in record and isinstance(chosen, str) and _HH_TURN.match(chosen):
        return "hh"
    return "preference"


def parse_preference_record(
    record: Any, format: PreferenceFormat | None = None
) -> PreferenceExample:
    """Parse one record into a PreferenceExample; BadRecord(reason) when it cannot be used."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise BadRecord(f"missing field {name!r}")
    format = format or detect_format(record)
    if format == "hh":
        chosen = _hh_messages(record["chosen"], "chosen")
        rejected = _hh_messages(record["rejected"], "rejected")
        example = _split_common_prefix(chosen, rejected)
    else:
        chosen = _messages(record["chosen"], "assistant", "chosen")
        rejected = _messages(record["rejected"], "assistant", "rejected")
        prompt = None
        if record.get("prompt") is not None:
            prompt = _messages(record["prompt"], "user", "prompt")
        if prompt is not None and not (
            _starts_with(chosen, prompt) and _starts_with(rejected, prompt)
        ):
            example = PreferenceExample(prompt, chosen, rejected)  # explicit
        else:  # implicit (UltraFeedback's `prompt` repeats the first turn)
            example = _split_common_prefix(chosen, rejected)
    _check_completions(example)
    example.margin = _margin(record)
    return example


def _messages(value: Any, role: str, field: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise BadRecord(f"field {field!r}: expected a string or a message list")
    messages = []
    for message in value:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise BadRecord(f"field {field!r}: messages need string 'role' and 'content'")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _hh_messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, str):
        raise BadRecord(f"field {field!r}: expected an Anthropic-HH transcript string")
    parts = _HH_TURN.split(value)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord(f"field {field!r}: not an Anthropic-HH transcript")
    # parts: ["", role, text, role, text, ...]
    return [
        {"role": _HH_ROLES[parts[i]], "content": parts[i + 1].strip()}
        for i in range(1, len(parts), 2)
    ]


def _starts_with(messages: list[Message], prefix: list[Message]) -> bool:
    return len(messages) > len(prefix) and messages[: len(prefix)] == prefix


def _split_common_prefix(chosen: list[Message], rejected: list[Message]) -> PreferenceExample:
    if chosen == rejected:
        raise BadRecord("identical chosen and rejected")
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    if common == 0:
        raise BadRecord("no common prompt")
    return PreferenceExample(chosen[:common], chosen[common:], rejected[common:])


def _check_completions(example: PreferenceExample) -> None:
    for name, messages in (("chosen", example.chosen), ("rejected", example.rejected)):
        if not messages or not any(m["content"].strip() for m in messages):
            raise BadRecord(f"empty completion ({name})")
    if example.chosen == example.rejected:
        raise BadRecord("identical chosen and rejected")


def _margin(record: dict[str, Any]) -> float | None:
    value: Any = record.get("margin")
    if value is None and record.get("score_chosen") is not None:
        chosen, rejected = record.get("score_chosen"), record.get("score_rejected")
        if not isinstance(chosen, int | float) or not isinstance(rejected, int | float):
            raise BadRecord("score_chosen and score_rejected must both be numbers")
        value = chosen - rejected
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRecord(f"margin: expected a finite number, got {value!r}")
    return float(value)


def parse_records(
    records: Iterable[tuple[str, Any]],
    skips: SkipCounter,
    format: PreferenceFormat | None = None,
) -> Iterator[tuple[str, PreferenceExample]]:
    """(where, example) for each usable (where, record); bad ones go to `skips` by reason
    (strict mode raises DataError "where: reason" at the first)."""
    for where, record in records:
        try:
            yield where, parse_preference_record(record, format)
        except BadRecord as exc:
            skips.skip(where, str(exc))


def read_jsonl(path: str | Path, skips: SkipCounter) -> Iterator[tuple[str, Any]]:
    """(`file:line`, record) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError:
                skips.skip(where, "invalid JSON")


# ---------------------------------------------------------------------------- tokenising
@dataclass
class TokenizedPair:
    """A pair as token ids: each full sequence and where its completion starts."""

    chosen_ids: list[int]
    chosen_start: int
    rejected_ids: list[int]
    rejected_start: int
    margin: float | None = None
    example_id: int = 0


def tokenize_pair(
    example: PreferenceExample,
    renderer: ChatRenderer,
    seq_len: int,
    truncation: Truncation = "error",
    example_id: int = 0,
) -> TokenizedPair:
    """Render and tokenise a pair; BadRecord when it cannot be used.

    A row of the batch is a sequence's first len - 1 tokens (inputs) and its last len - 1
    (targets), so a sequence fits when it has at most seq_len + 1 tokens. truncation "error":
    longer pairs are bad records; "drop": they are dropped (reason "too long (dropped)");
    "truncate": completions are cut to fit (never the prompt).
    """
    prompt_ids = list(renderer.render(example.prompt, add_generation_prompt=True))
    sequences = []
    for messages in (example.chosen, example.rejected):
        full = list(renderer.render(example.prompt + messages, add_generation_prompt=False))
        if full[: len(prompt_ids)] != prompt_ids:
            raise BadRecord("completion does not extend the prompt's rendering")
        if len(full) == len(prompt_ids):
            raise BadRecord("empty completion (no tokens)")
        sequences.append(full)
    longest = max(len(s) for s in sequences)
    if longest > seq_len + 1:
        if truncation == "error":
            raise BadRecord(f"too long for data.seq_len ({longest - 1} tokens > {seq_len})")
        if truncation == "drop":
            raise BadRecord("too long (dropped)")
        if len(prompt_ids) >= seq_len + 1:
            raise BadRecord(f"prompt too long for data.seq_len ({len(prompt_ids)} tokens)")
        sequences = [s[: seq_len + 1] for s in sequences]
    return TokenizedPair(
        sequences[0], len(prompt_ids), sequences[1], len(prompt_ids), example.margin, example_id
    )


def tokenize_examples(
    examples: Iterable[tuple[str, PreferenceExample]],
    renderer: ChatRenderer,
    seq_len: int,
    truncation: Truncation,
    skips: SkipCounter,
) -> list[TokenizedPair]:
    """Tokenise every example; the unusable ones are counted in `skips` ("too long (dropped)"
    as a drop, a choice of the config, never an error). Example ids number the kept pairs."""
    pairs: list[TokenizedPair] = []
    for where, example in examples:
        try:
            pairs.append(tokenize_pair(example, renderer, seq_len, truncation, len(pairs)))
        except BadRecord as exc:
            if str(exc) == "too long (dropped)":
                skips.drop(str(exc))
            else:
                skips.skip(where, str(exc))
    return pairs


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> Batch:
    """A Batch of 2n right-padded rows: the n chosen, then the n rejected sequences.

    labels are -100 outside the completions (prompt and padding); extras hold `example_ids`
    (n,) and `margins` (n,) (0 where a record has none).
    """
    sequences = [(p.chosen_ids, p.chosen_start) for p in pairs]
    sequences += [(p.rejected_ids, p.rejected_start) for p in pairs]
    width = max(len(ids) for ids, _ in sequences) - 1
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    pad_mask = torch.ones((len(sequences), width), dtype=torch.bool)
    for row, (ids, start) in enumerate(sequences):
        tokens = torch.tensor(ids, dtype=torch.long)
        length = len(ids) - 1
        input_ids[row, :length] = tokens[:-1]
        pad_mask[row, :length] = False
        # label t is token t + 1: a completion token from position start - 1 on (the first
        # token of a sequence is never a target).
        first = max(start, 1)
        labels[row, first - 1 : length] = tokens[first:]
    extras = {
        "example_ids": torch.tensor([p.example_id for p in pairs], dtype=torch.long),
        "margins": torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32),
    }
    return Batch(input_ids, labels, pad_mask=pad_mask, num_pairs=len(pairs), extras=extras)


# ---------------------------------------------------------------------------- the builtin set
BUILTIN_STDLIB_PREFERENCE = "builtin:stdlib-preference"
BUILTIN_STDLIB_SCRAMBLED = "builtin:stdlib-scrambled"
# Each built-in set and how it draws its rejected answers (stdlib_preference_records).
BUILTIN_PREFERENCE_SOURCES = {
    BUILTIN_STDLIB_PREFERENCE: "other",
    BUILTIN_STDLIB_SCRAMBLED: "scrambled",
}


def stdlib_preference_records(
    split: str, validation_percent: float = 2.0, limit: int = 2048, rejected: str = "other"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`builtin:stdlib-preference` (`rejected="other"`) and `builtin:stdlib-scrambled`
    (`rejected="scrambled"`): (where, record) preference pairs from the standard library.

    The prompt asks for a public function's docstring (as `builtin:stdlib-instruct` does); the
    chosen answer is the first paragraph of its own docstring. The rejected one is
    - "other": another function's (half the set away, so never a neighbour from the same
      file): a relevance judgement;
    - "scrambled": the chosen answer's own words in a seeded random order (the same words and
      length, no longer a sentence; answers of one word are skipped): a fluency judgement,
      which a small model learns in minutes where it does not learn relevance.
    The split follows `builtin:stdlib` (by file), at most `limit` pairs, in a fixed order:
    every run builds the same set.
    """
    from itertools import islice

    from data_pipeline.sources import stdlib_instructions

    if rejected not in ("other", "scrambled"):
        raise ValueError(f"rejected: 'other' or 'scrambled', got {rejected!r}")
    items = list(islice(stdlib_instructions(split, validation_percent), limit))
    for index, (where, record) in enumerate(items):
        question, answer = (m["content"] for m in record["messages"])
        if rejected == "scrambled":
            other = _scrambled(answer, random.Random(f"{where}:{index}"))
        else:
            other = items[(index + len(items) // 2) % len(items)][1]["messages"][1]["content"]
        if other is None or other == answer:
            continue
        yield where, {"prompt": question, "chosen": answer, "rejected": other}


def _scrambled(text: str, rng: random.Random) -> str | None:
    """`text`'s words in another order (None when every order reads the same)."""
    words = text.split()
    if len(set(words)) < 2:
        return None
    order = words[:]
    while order == words:
        rng.shuffle(order)
    return " ".join(order)
