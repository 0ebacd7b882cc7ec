"""SFT data: record formats, bad records, truncation, packing vs padding (on the data side and
through `model.Transformer`), epochs, world-size independent positions and exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("tokenizers")

from data_pipeline.batch import IGNORE_INDEX, Batch
from data_pipeline.chat import CHATML_TEMPLATE, ChatTemplate
from data_pipeline.config import ChatConfig, SFTConfig, SourceConfig
from data_pipeline.conversations import (
    RecordError,
    SFTDataset,
    SFTLoader,
    build_sft_dataset,
    epoch_rows,
    pack_best_fit,
    record_messages,
    rows_to_batch,
)
from data_pipeline.errors import DataError
from data_pipeline.sources import SkipCounter, iter_outcomes, iter_record_outcomes
from data_pipeline.tokenizer import HFTokenizer
from tests.test_chat import build_folder

WORDS = [
    "the",
    "number",
    "of",
    "items",
    "in",
    "a",
    "new",
    "sorted",
    "list",
    "input",
    "is",
    "unchanged",
    "what",
    "does",
    "return",
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> ChatTemplate:
    folder = build_folder("chatml", tmp_path_factory.mktemp("tok"))
    return ChatTemplate(CHATML_TEMPLATE, HFTokenizer.from_file(folder / "tokenizer.json"))


def conversation(i: int) -> dict[str, Any]:
    """A deterministic conversation of 1-3 turns whose length varies with i."""
    turns = []
    for turn in range(1 + i % 3):
        question = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + (i * 7 + turn) % 9))
        answer = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(1 + (i * 5 + turn) % 13))
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_record_formats() -> None:
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert record_messages({"messages": expected}) == expected
    assert record_messages({"prompt": "Hi", "completion": "Hello"}) == expected
    assert record_messages({"prompt": expected[:1], "completion": expected[1:]}) == expected
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    assert record_messages(sharegpt) == [{"role": "system", "content": "Be brief."}, *expected]
    assert record_messages({"text": "plain"}) == [{"role": "text", "content": "plain"}]
    # A source's explicit format overrides detection.
    with pytest.raises(RecordError, match="'messages' is not a list"):
        record_messages({"text": "plain", "messages": "x"}, "messages")
    assert record_messages({"text": "plain", "messages": "x"}, "text")[0]["role"] == "text"


BAD_RECORDS = {
    "unknown role 'robot'": {"messages": [{"role": "robot", "content": "x"}]},
    "message without a role": {"messages": [{"content": "x"}]},
    "message content is not a string": {
        "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]
    },
    "no assistant turn": {"messages": [{"role": "user", "content": "x"}]},
    "empty assistant turn": {
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]
    },
    "unknown role 'bot'": {"conversations": [{"from": "bot", "value": "x"}]},
    "conversation of": {
        "messages": [
            {"role": "user", "content": "the " * 200},
            {"role": "assistant", "content": "x"},
        ]
    },
    "malformed JSON": '{"messages": [',
}


def test_every_bad_record_kind_is_counted_or_stops_a_strict_run(
    tmp_path: Path, template: ChatTemplate
) -> None:
    good = [conversation(i) for i in range(3)]
    records = [good[0], *BAD_RECORDS.values(), good[1], good[2]]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    dataset = build_sft_dataset([SourceConfig(str(path))], "train", template, SFTConfig(), 128)
    assert len(dataset) == 3
    counts = dataset.skips.counts
    assert sum(counts.values()) == len(BAD_RECORDS)
    for reason in BAD_RECORDS:
        assert sum(n for r, n in counts.items() if r.startswith(reason)) == 1, (reason, counts)
    # Strict: the first bad record stops the run with file:line: reason.
    for line, reason in enumerate(BAD_RECORDS, start=2):
        path = write_jsonl(tmp_path / f"strict{line}.jsonl", [good[0], BAD_RECORDS[reason]])
        with pytest.raises(DataError) as raised:
            build_sft_dataset([SourceConfig(str(path))], "train", template, SFTConfig(), 128, True)
        assert str(raised.value).startswith(f"{path}:2: {reason}")
        assert "\n" not in str(raised.value)


def test_truncation_policies(tmp_path: Path, template: ChatTemplate) -> None:
    long = {
        "messages": [
            {"role": "user", "content": "what"},
            {"role": "assistant", "content": "the " * 80},
        ]
    }
    path = write_jsonl(tmp_path / "long.jsonl", [conversation(0), long])
    source = [SourceConfig(str(path))]
    dropped = build_sft_dataset(source, "train", template, SFTConfig(truncation="drop"), 40)
    assert len(dropped) == 1 and dropped.skips.counts == {"drop: longer than data.seq_len": 1}
    cut = build_sft_dataset(source, "train", template, SFTConfig(truncation="truncate"), 40)
    assert len(cut) == 2 and len(cut.conversations[1]) == 40
    full = template.tokenize(long["messages"])
    assert cut.conversations[1].ids == full.ids[:40]  # the prompt is kept whole
    assert cut.conversations[1].trained == full.trained[:40]


def test_text_files_and_records_through_the_source_layer(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a whole document")
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    skips = SkipCounter(strict=False)
    outcomes = list(iter_record_outcomes(SourceConfig(str(tmp_path)), "validation", skips))
    assert outcomes == [
        (str(tmp_path / "a.txt"), {"text": "a whole document"}),
        (f"{tmp_path / 'b.jsonl'}:1", {"prompt": "p", "completion": "c"}),
    ]


def test_best_fit_decreasing() -> None:
    lengths = [7, 3, 5, 2, 8, 1, 4, 6]
    rows = pack_best_fit(lengths, 10)
    assert rows == pack_best_fit(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    # 36 tokens in rows of 10: best-fit decreasing reaches the minimum of 4 rows here.
    assert rows == [[4, 3], [0, 1], [7, 6], [2, 5]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_best_fit([11], 10)


def _dataset(template: ChatTemplate, count: int, seq_len: int = 128) -> SFTDataset:
    conversations = [template.tokenize(conversation(i)["messages"]) for i in range(count)]
    assert all(len(c) <= seq_len for c in conversations)
    return SFTDataset(conversations, SkipCounter(False))


def _segments(batch: Batch) -> list[tuple[list[int], list[int], list[int]]]:
    """(tokens, labels, positions) of each conversation in a batch, row by row."""
    out = []
    assert batch.positions is not None and batch.pad_mask is not None
    for r in range(batch.input_ids.shape[0]):
        keep = ~batch.pad_mask[r]
        doc_ids = (
            batch.doc_ids[r][keep] if batch.doc_ids is not None else torch.zeros(int(keep.sum()))
        )
        for doc in doc_ids.unique(sorted=True):
            where = keep.clone()
            where[keep] = doc_ids == doc
            out.append(
                tuple(
                    t[r][where].tolist() for t in (batch.input_ids, batch.labels, batch.positions)
                )
            )
    return out  # type: ignore[return-value]


def test_packed_equals_padded_on_the_data_side(template: ChatTemplate) -> None:
    dataset = _dataset(template, 24)
    lengths = [len(c) for c in dataset.conversations]
    packed_rows = epoch_rows(lengths, 128, seed=3, epoch=0, packing=True, buffer=24)
    assert len(packed_rows) < 24  # several conversations share rows
    packed = rows_to_batch(dataset.conversations, packed_rows, 128, 0, packed=True)
    padded = rows_to_batch(dataset.conversations, [[i] for i in range(24)], None, 0, packed=False)
    order = [i for row in packed_rows for i in row]
    by_conversation = dict(zip(order, _segments(packed), strict=True))
    assert [by_conversation[i] for i in range(24)] == _segments(padded)
    # Labels are aligned and masked: label t is token t + 1 where that token is trained.
    for index, (tokens, labels, positions) in enumerate(_segments(padded)):
        c = dataset.conversations[index]
        assert tokens == c.ids and positions == list(range(len(c)))
        assert labels == [
            c.ids[t + 1] if t + 1 < len(c) and c.trained[t + 1] else IGNORE_INDEX
            for t in range(len(c))
        ]
    assert (
        packed.num_target_tokens
        == padded.num_target_tokens
        == sum(c.num_trained for c in dataset.conversations)
    )
    assert padded.pad_mask is not None and padded.doc_ids is None
    assert padded.num_tokens == packed.num_tokens == sum(lengths)


def _loss_and_grads(
    model: torch.nn.Module, batch: Batch, masking: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(
        batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids if masking else None
    )
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="sum"
    ) / max(batch.num_target_tokens, 1)
    loss.backward()
    return loss.detach(), [
        p.grad.detach().clone() for p in model.parameters() if p.grad is not None
    ]


def test_packed_equals_padded_through_the_model(template: ChatTemplate) -> None:
    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(0)
    vocab = template.tokenizer.vocab_size
    model = Transformer(
        ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    ).float()
    model.init_weights()
    dataset = _dataset(template, 10)
    lengths = [len(c) for c in dataset.conversations]
    rows = epoch_rows(lengths, 128, seed=0, epoch=0, packing=True, buffer=10)
    packed = rows_to_batch(dataset.conversations, rows, 128, 0, packed=True)
    padded = rows_to_batch(dataset.conversations, [[i] for i in range(10)], None, 0, packed=False)
    loss_packed, grads_packed = _loss_and_grads(model, packed, masking=True)
    loss_padded, grads_padded = _loss_and_grads(model, padded, masking=True)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_packed, grads_padded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Negative control: packed rows without document masking attend across conversations.
    loss_leaky, _ = _loss_and_grads(model, packed, masking=False)
    assert abs(loss_leaky.item() - loss_padded.item()) > 1e-4


def _loader(dataset: SFTDataset, world_size: int, rank: int, **kwargs: Any) -> SFTLoader:
    options: dict[str, Any] = {"seed": 5, "epochs": 2}
    options.update(kwargs)
    return SFTLoader(
        dataset,
        seq_len=128,
        global_batch_rows=4,
        micro_batch_rows=4 // world_size if world_size < 4 else 1,
        pad_id=0,
        config=SFTConfig(pack_buffer=8),
        rank=rank,
        world_size=world_size,
        **options,
    )


def _global_steps(dataset: SFTDataset, world_size: int, **kwargs: Any) -> list[list[list[int]]]:
    """Every step's global batch, as the token rows all ranks saw together."""
    per_rank = [list(_loader(dataset, world_size, r, **kwargs)) for r in range(world_size)]
    steps = []
    for step in zip(*per_rank, strict=True):
        steps.append([row for rank in step for b in rank for row in b.input_ids.tolist()])
    return steps


def test_epochs_are_shuffled_deterministically(template: ChatTemplate) -> None:
    lengths = [len(c) for c in _dataset(template, 30).conversations]
    first = epoch_rows(lengths, 128, seed=1, epoch=0, packing=True, buffer=8)
    assert first == epoch_rows(lengths, 128, seed=1, epoch=0, packing=True, buffer=8)
    assert first != epoch_rows(lengths, 128, seed=1, epoch=1, packing=True, buffer=8)
    assert first != epoch_rows(lengths, 128, seed=2, epoch=0, packing=True, buffer=8)
    for epoch in range(3):  # every conversation exactly once per epoch
        rows = epoch_rows(lengths, 128, seed=1, epoch=epoch, packing=True, buffer=8)
        assert sorted(i for row in rows for i in row) == list(range(30))


def test_global_batches_identical_on_any_world_size(template: ChatTemplate) -> None:
    dataset = _dataset(template, 30)
    single = _global_steps(dataset, 1)
    loader = _loader(dataset, 1, 0)
    assert len(single) == loader.steps_per_epoch(0) + loader.steps_per_epoch(1) >= 4
    assert _global_steps(dataset, 2) == single
    assert _global_steps(dataset, 4) == single
    assert _global_steps(dataset, 2, max_steps=3) == single[:3]
    # Negative control: another seed gives other batches.
    assert _global_steps(dataset, 1, seed=6) != single


def test_resume_mid_epoch_gives_exactly_the_remaining_batches(template: ChatTemplate) -> None:
    dataset = _dataset(template, 30)
    everything = _global_steps(dataset, 1)
    first = _loader(dataset, 1, 0)
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["steps"] == 3
    # Resume on two ranks from the single-rank position.
    resumed = [_loader(dataset, 2, r) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(json.loads(json.dumps(state)))
    rest = [
        [row for rank in step for b in rank for row in b.input_ids.tolist()]
        for step in zip(*resumed, strict=True)
    ]
    assert rest == everything[3:]


def test_loader_checks_its_shape(template: ChatTemplate) -> None:
    dataset = _dataset(template, 8)
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        SFTLoader(dataset, 128, 4, 1, 0, SFTConfig(), world_size=3)
    with pytest.raises(ValueError, match="micro_batch_size"):
        SFTLoader(dataset, 128, 4, 3, 0, SFTConfig())
    with pytest.raises(ValueError, match="fewer rows than one global batch"):
        SFTLoader(dataset, 128, 64, 1, 0, SFTConfig())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"^train_on:"):
        SFTConfig(train_on="user")
    with pytest.raises(ValueError, match=r"^truncation:"):
        SFTConfig(truncation="cut")
    with pytest.raises(ValueError, match=r"^format:"):
        SourceConfig("x.jsonl", format="alpaca")
    with pytest.raises(ValueError, match=r"^template:"):
        ChatConfig("")
    assert SourceConfig("x.jsonl", format="sharegpt").format == "sharegpt"


def test_stdlib_instruct_is_deterministic_with_a_held_out_split(template: ChatTemplate) -> None:
    from itertools import islice

    source = SourceConfig("builtin:stdlib-instruct")
    skips = SkipCounter(strict=True)
    train = list(islice(iter_record_outcomes(source, "train", skips), 200))
    assert train == list(islice(iter_record_outcomes(source, "train", skips), 200))
    validation = list(islice(iter_record_outcomes(source, "validation", skips), 50))
    assert len(train) == 200 and len(validation) == 50
    files = {where.rsplit(":", 1)[0] for where, _ in train}
    assert not files & {where.rsplit(":", 1)[0] for where, _ in validation}
    _, record = train[0]
    assert record is not None
    user, assistant = record_messages(record)
    assert user["content"].startswith("Write the docstring of this function:\ndef ")
    assert assistant["content"] and "\n\n" not in assistant["content"]
    with pytest.raises(DataError, match="post-training"):
        next(iter_outcomes(source, "train", skips))  # not a text corpus for pretraining


def test_source_weights_set_how_often_each_source_is_seen(
    tmp_path: Path, template: ChatTemplate
) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [conversation(i) for i in range(8)])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation(i) for i in range(8, 16)])
    sources = [SourceConfig(str(a), weight=2.0), SourceConfig(str(b), weight=0.25)]
    dataset = build_sft_dataset(sources, "train", template, SFTConfig(), 128)
    assert dataset.source_of == [0] * 8 + [1] * 8
    lengths = [len(c) for c in dataset.conversations]
    seen = []
    for epoch in range(2):
        rows = epoch_rows(lengths, 128, 0, epoch, True, 64, dataset.source_of, dataset.weights)
        drawn = sorted(i for row in rows for i in row)
        assert drawn[:16] == sorted(list(range(8)) * 2)  # source a: twice
        assert len(drawn) == 18 and all(i >= 8 for i in drawn[16:])  # b: a quarter
        seen.append(drawn[16:])
        assert rows == epoch_rows(
            lengths, 128, 0, epoch, True, 64, dataset.source_of, dataset.weights
        )
    assert seen[0] != seen[1]  # a different quarter of b each epoch
