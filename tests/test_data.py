"""Tokenizer, sources, packing and the resumable data state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.packing import GlobalBatchLoader, build_packed_sequences
from data_pipeline.sources import SkipCounter, iter_documents, stdlib_files
from data_pipeline.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(corpus: Path) -> Tokenizer:
    texts = iter_documents(SourceConfig(str(corpus / "train.jsonl")), "train", SkipCounter(False))
    return train_tokenizer(texts, vocab_size=320)


def test_tokenizer_round_trip_and_special_ids(tokenizer: Tokenizer, tmp_path: Path) -> None:
    samples = [
        "def f(x):\n    return x  # spaces   kept\n\n\ttab\n",
        "unicode: naïve café 日本語 🙂 — and bytes never seen in training",
        "  leading and trailing whitespace  ",
    ]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert tokenizer.vocab_size == 320
    loaded = Tokenizer.load(tokenizer.save(tmp_path))
    assert loaded.encode(samples[0]) == tokenizer.encode(samples[0])
    assert loaded.sha256 == tokenizer.sha256


def test_bad_tokenizer_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path)
    with pytest.raises(DataError, match="tokenizer model not found"):
        Tokenizer.load(tmp_path / "nowhere.model")


def test_packing_keeps_every_token_of_every_document_exactly_once(
    tokenizer: Tokenizer, corpus: Path
) -> None:
    source = SourceConfig(str(corpus / "validation.jsonl"))
    documents = list(iter_documents(source, "validation", SkipCounter(False)))
    expected: list[int] = []
    for text in documents:
        expected += [*tokenizer.encode(text), tokenizer.eos_id]
    stream = build_packed_sequences(
        [source], "validation", tokenizer, DataConfig(seq_len=16), SkipCounter(False), loop=False
    )
    sequences = list(stream)
    inputs = [t for s in sequences for t in s[:-1].tolist()]
    assert len(sequences) == (len(expected) - 1) // 16
    assert inputs == expected[: len(inputs)]  # inputs tile the stream: no token lost or repeated
    for seq in sequences:  # labels are inputs shifted by one
        assert seq.shape == (17,)
    assert sequences[1][0] == sequences[0][-1]
    assert tokenizer.eos_id in inputs


def test_resumed_stream_continues_with_exactly_the_next_tokens(
    tokenizer: Tokenizer, corpus: Path
) -> None:
    source = SourceConfig(str(corpus / "validation.jsonl"))  # small: wraps into later epochs
    config = DataConfig(seq_len=32)

    def fresh() -> GlobalBatchLoader:
        seqs = build_packed_sequences(
            [source], "train", tokenizer, config, SkipCounter(False), loop=True
        )
        return GlobalBatchLoader(
            seqs, global_batch_seqs=4, micro_batch_size=2, rank=0, world_size=1
        )

    straight = fresh()
    batches = [straight.next_batch() for _ in range(240)]  # long enough to wrap into epoch 2
    interrupted = fresh()
    for _ in range(150):
        interrupted.next_batch()
    state = json.loads(json.dumps(interrupted.state_dict()))  # as saved in a checkpoint
    resumed = fresh()
    resumed.load_state_dict(state)
    for expected in batches[150:]:
        for (x, y), (x2, y2) in zip(expected, resumed.next_batch(), strict=True):
            assert x.equal(x2) and y.equal(y2)
    assert straight.sequences.streams[0].epoch >= 1


def test_ranks_take_disjoint_slices_of_the_same_global_batch(
    tokenizer: Tokenizer, corpus: Path
) -> None:
    source = SourceConfig(str(corpus / "train.jsonl"))

    def loader(rank: int, world: int, micro: int) -> GlobalBatchLoader:
        seqs = build_packed_sequences(
            [source], "train", tokenizer, DataConfig(seq_len=16), SkipCounter(False), loop=True
        )
        return GlobalBatchLoader(seqs, 8, micro, rank, world)

    single = next(x for x, _ in loader(0, 1, 8).next_batch())
    halves = [x for rank in range(2) for x, _ in loader(rank, 2, 2).next_batch()]
    assert single.equal(torch.cat(halves))
    with pytest.raises(DataError, match="not divisible"):
        loader(0, 3, 1)


def test_mixture_token_shares_follow_weights(tokenizer: Tokenizer, corpus: Path) -> None:
    sources = [
        SourceConfig(str(corpus / "train.jsonl"), weight=3.0, name="a"),
        SourceConfig(str(corpus / "validation.jsonl"), weight=1.0, name="b"),
    ]
    stream = build_packed_sequences(
        sources, "train", tokenizer, DataConfig(seq_len=64), SkipCounter(False), loop=True
    )
    for _ in range(300):
        stream.next_sequence()
    counts = stream.tokens_by_source()
    share = counts["a"] / (counts["a"] + counts["b"])
    assert share == pytest.approx(0.75, abs=0.02)


def test_bad_records_are_counted_or_stop_in_strict_mode(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "   "}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "good two"}),
    ]
    path.write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n' + b'{"text": "trunc'
    )
    skips = SkipCounter(strict=False)
    texts = list(iter_documents(SourceConfig(str(path)), "train", skips))
    assert texts == ["good one", "good two"]
    assert skips.counts == {
        "malformed JSON": 1,
        "truncated last line": 1,
        "missing field 'text'": 1,
        "field 'text' is not a string": 1,
        "empty document": 1,
        "record is not a JSON object": 1,
        "invalid UTF-8": 1,
    }
    with pytest.raises(DataError, match=rf"^{path}:2: malformed JSON$"):
        list(iter_documents(SourceConfig(str(path)), "train", SkipCounter(strict=True)))


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        list(
            iter_documents(SourceConfig(str(tmp_path / "nope.jsonl")), "train", SkipCounter(False))
        )
    with pytest.raises(DataError, match="unknown builtin"):
        list(iter_documents(SourceConfig("builtin:nothing"), "train", SkipCounter(False)))


def test_stdlib_split_is_disjoint_and_deterministic() -> None:
    train, validation = stdlib_files("train", 2.0), stdlib_files("validation", 2.0)
    assert train and validation and not set(train) & set(validation)
    assert stdlib_files("validation", 2.0) == validation
    assert len(validation) < len(train) / 10
