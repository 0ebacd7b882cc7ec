"""Preference records: each format, each bad-record reason, tokenisation and the Batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_pipeline.batch import IGNORE_INDEX  # noqa: E402
from data_pipeline.errors import DataError  # noqa: E402
from data_pipeline.preference import (  # noqa: E402
    BadRecord,
    Message,
    PreferenceExample,
    collate_pairs,
    parse_preference_record,
    parse_records,
    read_jsonl,
    tokenize_examples,
)
from data_pipeline.sources import SkipCounter  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chat_tokenizer() -> Any:
    """A tiny byte-level BPE with ChatML special tokens and template, built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = ["What is the capital of France? Paris is the capital.", "Tell me a joke about cats."]
    trainer = BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts * 20, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


class TemplateRenderer:
    """The ChatRenderer protocol over a transformers tokenizer's apply_chat_template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def test_explicit_strings_and_message_lists() -> None:
    example = parse_preference_record({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go."})
    assert example == PreferenceExample([user("Hi?")], [assistant("Hello!")], [assistant("Go.")])
    record = {
        "prompt": [{"role": "system", "content": "Be kind."}, user("Hi?")],
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Go.")],
        "margin": 2,
    }
    example = parse_preference_record(record)
    assert example.prompt == record["prompt"] and example.chosen == [assistant("Hello!")]
    assert example.margin == 2.0


def test_implicit_conversations_and_ultrafeedback_margins() -> None:
    record = {
        "prompt": "Hi?",  # UltraFeedback-binarized repeats the first user turn here
        "chosen": [user("Hi?"), assistant("Hello!")],
        "rejected": [user("Hi?"), assistant("Go.")],
        "score_chosen": 8.5,
        "score_rejected": 3.0,
    }
    example = parse_preference_record(record)
    assert example == PreferenceExample(
        [user("Hi?")], [assistant("Hello!")], [assistant("Go.")], margin=5.5
    )
    multi = {
        "chosen": [user("a"), assistant("b"), user("c"), assistant("good")],
        "rejected": [user("a"), assistant("b"), user("c"), assistant("bad")],
    }
    example = parse_preference_record(multi)
    assert example.prompt == multi["chosen"][:3] and example.rejected == [assistant("bad")]


def test_anthropic_hh_strings() -> None:
    shared = "\n\nHuman: How do I bake bread?\n\nAssistant: Use flour.\n\nHuman: And then?"
    record = {
        "chosen": shared + "\n\nAssistant: Knead and bake it.",
        "rejected": shared + "\n\nAssistant: No idea.",
    }
    example = parse_preference_record(record)
    assert example.prompt == [
        user("How do I bake bread?"),
        assistant("Use flour."),
        user("And then?"),
    ]
    assert example.chosen == [assistant("Knead and bake it.")]
    assert example.rejected == [assistant("No idea.")]


BAD_RECORDS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "empty completion (chosen)"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical chosen and rejected"),
    (
        {"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("y")]},
        "no common prompt",
    ),
    (
        {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
        "identical chosen and rejected",
    ),
    (
        {"chosen": [user("a"), assistant("b")], "rejected": [user("a")]},
        "empty completion (rejected)",
    ),
]


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def test_each_bad_record_is_counted_by_reason_and_strict_names_file_and_line(
    tmp_path: Path,
) -> None:
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    lines: list[Any] = [good, *(record for record, _ in BAD_RECORDS), "{not json", good]
    path = write_jsonl(tmp_path / "prefs.jsonl", lines)
    skips = SkipCounter(strict=False)
    kept = list(parse_records(read_jsonl(path, skips), skips))
    assert [where for where, _ in kept] == [f"{path}:1", f"{path}:{len(lines)}"]
    expected: dict[str, int] = {"invalid JSON": 1}
    for _, reason in BAD_RECORDS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(skips.counts) == expected
    strict = SkipCounter(strict=True)
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'rejected'$"):
        list(parse_records(read_jsonl(path, strict), strict))


def test_tokenised_completion_is_exactly_the_tokens_after_the_prompt() -> None:
    tokenizer = chat_tokenizer()
    renderer = TemplateRenderer(tokenizer)
    examples = [
        (
            "a:1",
            parse_preference_record(
                {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome, I think."}
            ),
        ),
        (
            "a:2",
            parse_preference_record(
                {"prompt": "A joke?", "chosen": "Cats nap.", "rejected": "No.", "margin": 1.5}
            ),
        ),
    ]
    skips = SkipCounter(strict=True)
    pairs = tokenize_examples(examples, renderer, seq_len=64, truncation="error", skips=skips)
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    assert batch.num_pairs == 2 and batch.input_ids.shape[0] == 4
    assert batch.extras["example_ids"].tolist() == [0, 1]
    assert batch.extras["margins"].tolist() == [0.0, 1.5]
    rows = [ex.chosen for _, ex in examples] + [ex.rejected for _, ex in examples]
    prompts = [ex.prompt for _, ex in examples] * 2
    for row, (prompt, completion) in enumerate(zip(prompts, rows, strict=True)):
        targets = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        # The targets decode to the assistant content and ChatML's end of turn, nothing else.
        assert tokenizer.decode(targets) == completion[0]["content"] + "<|im_end|>\n"
        full = renderer.render(prompt + completion, add_generation_prompt=False)
        real = ~batch.pad_mask[row]
        assert batch.input_ids[row][real].tolist() == full[:-1]
        assert (batch.labels[row][batch.pad_mask[row]] == IGNORE_INDEX).all()
        # Aligned: label t is input t + 1.
        inputs = batch.input_ids[row][real]
        labels = batch.labels[row][real]
        mask = labels[:-1] != IGNORE_INDEX
        assert torch.equal(labels[:-1][mask], inputs[1:][mask])


class StripOnCompletion(TemplateRenderer):
    """A template whose generation prompt is not what the finished turn renders (as templates
    that drop a reasoning block do): the prefix property fails."""

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        ids = super().render(messages, add_generation_prompt)
        return [*ids, 5] if add_generation_prompt else ids


def test_too_long_and_prefix_violations_are_counted() -> None:
    tokenizer = chat_tokenizer()
    renderer = TemplateRenderer(tokenizer)
    long_example = parse_preference_record(
        {"prompt": "Hi", "chosen": "Paris is the capital. " * 20, "rejected": "No."}
    )
    examples = [("f:1", long_example)]
    skips = SkipCounter(strict=False)
    assert tokenize_examples(examples, renderer, 32, "error", skips) == []
    assert list(skips.counts) == [next(iter(skips.counts))]
    assert next(iter(skips.counts)).startswith("too long for data.seq_len (")
    with pytest.raises(DataError, match=r"^f:1: too long for data.seq_len \(\d+ tokens > 32\)$"):
        tokenize_examples(examples, renderer, 32, "error", SkipCounter(strict=True))
    dropped = SkipCounter(strict=True)  # a drop is the config's choice: counted, never raised
    assert tokenize_examples(examples, renderer, 32, "drop", dropped) == []
    assert dict(dropped.counts) == {"too long (dropped)": 1}
    (pair,) = tokenize_examples(examples, renderer, 32, "truncate", SkipCounter(strict=True))
    assert len(pair.chosen_ids) == 33 and pair.chosen_start < 33
    assert len(pair.rejected_ids) < 33
    broken = SkipCounter(strict=False)
    short = parse_preference_record({"prompt": "Hi", "chosen": "Yes.", "rejected": "No."})
    assert (
        tokenize_examples([("f:2", short)], StripOnCompletion(tokenizer), 64, "error", broken) == []
    )
    assert dict(broken.counts) == {"completion does not extend the prompt's rendering": 1}


def test_unusable_record_types() -> None:
    with pytest.raises(BadRecord, match="expected a JSON object"):
        parse_preference_record(["a"])
    with pytest.raises(BadRecord, match="margin"):
        parse_preference_record({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"})


def test_builtin_stdlib_pairs_other_and_scrambled() -> None:
    """builtin:stdlib-preference rejects with another function's docstring; builtin:stdlib-
    scrambled with the chosen answer's own words reordered (seeded: every run the same set).
    Both share prompts and chosen answers, and the held-out split shares no source file."""
    from itertools import islice

    from data_pipeline.preference import stdlib_preference_records

    other = list(stdlib_preference_records("train"))
    scrambled = list(stdlib_preference_records("train", rejected="scrambled"))
    assert [r["prompt"] for _, r in other] == [r["prompt"] for _, r in scrambled]
    assert [r["chosen"] for _, r in other] == [r["chosen"] for _, r in scrambled]
    chosen = {r["chosen"] for _, r in other}
    assert all(r["rejected"] in chosen for _, r in other)  # someone else's answer
    for _, record in scrambled:
        words, reordered = record["chosen"].split(), record["rejected"].split()
        assert sorted(words) == sorted(reordered) and words != reordered
    again = list(islice(stdlib_preference_records("train", rejected="scrambled"), 50))
    assert again == scrambled[:50]
    held_out = {where.rsplit(":", 1)[0] for where, _ in stdlib_preference_records("validation")}
    assert held_out and not held_out & {where.rsplit(":", 1)[0] for where, _ in other}
    with pytest.raises(ValueError, match="'other' or 'scrambled'"):
        next(stdlib_preference_records("train", rejected="shuffled"))
