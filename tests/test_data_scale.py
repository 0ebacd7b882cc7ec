"""The data pipeline at scale: compressed and bad input, filters, reader sharding, mixtures
with a schedule, resume across world sizes, and pre-tokenized memory-mapped shards."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zstandard

from data_pipeline.config import DataConfig, MixturePhase, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.packing import GlobalBatchLoader, PackedSequences, build_packed_sequences
from data_pipeline.shards import METADATA_FILE, ShardSource, prepare_shards, token_dtype
from data_pipeline.sources import DocumentFilter, Reader, SkipCounter, iter_documents
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from tests.helpers import synthetic_document


@pytest.fixture(scope="module")
def tokenizer(corpus: Path) -> Tokenizer:
    texts = iter_documents(SourceConfig(str(corpus / "train.jsonl")), "train", SkipCounter(False))
    return train_tokenizer(texts, vocab_size=320)


def _compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _write(path: Path, data: bytes) -> Path:
    suffix = path.suffix if path.suffix in (".gz", ".zst") else ""
    path.write_bytes(_compress(data, suffix))
    return path


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"# doc {seed}-{i}\n" + synthetic_document(rng) for i in range(n)]


# ---------------------------------------------------------------- compressed and bad input
@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_compressed_files_read_like_plain_ones(tmp_path: Path, suffix: str) -> None:
    texts = _docs(5, 1)
    jsonl = _write(tmp_path / f"a.jsonl{suffix}", _jsonl(texts))
    txt = _write(tmp_path / f"b.txt{suffix}", texts[0].encode())
    array = _write(tmp_path / f"c.json{suffix}", json.dumps([{"text": t} for t in texts]).encode())
    for path, expected in ((jsonl, texts), (txt, texts[:1]), (array, texts)):
        assert list(iter_documents(SourceConfig(str(path)), "train", SkipCounter(True))) == expected


BAD_LINES: dict[str, bytes] = {
    "malformed JSON": b"{not json\n",
    "missing field 'text'": b'{"body": "no text field"}\n',
    "field 'text' is not a string": b'{"text": 42}\n',
    "invalid UTF-8": b'{"text": "bad \xff byte"}\n',
    "empty document": b'{"text": "   "}\n',
    "record is not a JSON object": b'["a", "list"]\n',
    "truncated last line": b'{"text": "cut',
}


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_every_bad_record_kind_is_counted_or_stops_strict(tmp_path: Path, suffix: str) -> None:
    good = _jsonl(["good one"])
    lines = [good, *(line for kind, line in BAD_LINES.items() if kind != "truncated last line")]
    body = b"".join(lines) + _jsonl(["good two"]) + BAD_LINES["truncated last line"]
    path = _write(tmp_path / f"bad.jsonl{suffix}", body)
    skips = SkipCounter(strict=False)
    assert list(iter_documents(SourceConfig(str(path)), "train", skips)) == ["good one", "good two"]
    assert skips.counts == dict.fromkeys(BAD_LINES, 1)
    # strict: each kind alone, after one good line, stops with file:line: reason
    for kind, line in BAD_LINES.items():
        single = _write(tmp_path / f"one.jsonl{suffix}", good + line)
        with pytest.raises(DataError, match=rf"^{single}:2: {kind}$"):
            list(iter_documents(SourceConfig(str(single)), "train", SkipCounter(strict=True)))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_unreadable_and_corrupt_files(tmp_path: Path, suffix: str) -> None:
    texts = _docs(40, 2)
    whole = _compress(_jsonl(texts), suffix)
    broken = tmp_path / f"broken.jsonl{suffix}"
    broken.write_bytes(whole[: len(whole) // 2])  # cut mid-stream
    garbage = tmp_path / f"garbage.jsonl{suffix}"
    garbage.write_bytes(b"this is not compressed data at all" * 10)
    for path in (broken, garbage):
        skips = SkipCounter(strict=False)
        got = list(iter_documents(SourceConfig(str(path)), "train", skips))
        assert got == texts[: len(got)] and len(got) < len(texts)
        assert skips.counts["unreadable file"] == 1
        with pytest.raises(DataError, match=rf"^{path}:\d+: unreadable file$"):
            list(iter_documents(SourceConfig(str(path)), "train", SkipCounter(strict=True)))
    bad_txt = _write(tmp_path / "bad.txt", b"valid start \xff\xfe then not")
    skips = SkipCounter(strict=False)
    assert list(iter_documents(SourceConfig(str(bad_txt)), "train", skips)) == []
    assert skips.counts == {"invalid UTF-8": 1}
    with pytest.raises(DataError, match=rf"^{bad_txt}: invalid UTF-8$"):
        list(iter_documents(SourceConfig(str(bad_txt)), "train", SkipCounter(strict=True)))


def test_documents_far_longer_than_seq_len(tokenizer: Tokenizer, tmp_path: Path) -> None:
    texts = ["short one", "word " * 400, "short two"]
    path = _write(tmp_path / "long.jsonl", _jsonl(texts))
    source = SourceConfig(str(path))
    config = DataConfig(seq_len=8, max_doc_tokens=64)
    skips = SkipCounter(strict=False)
    stream = build_packed_sequences([source], "train", tokenizer, config, skips, loop=False)
    tokens = [t for s in stream for t in s[:-1].tolist()]
    assert tokenizer.decode(tokens).startswith("short one")
    assert skips.counts == {"document longer than 64 tokens": 1}
    strict = build_packed_sequences([source], "train", tokenizer, config, SkipCounter(True), False)
    with pytest.raises(DataError, match=rf"^{path}:2: document longer than 64 tokens$"):
        list(strict)


def test_quality_filters_are_counted(tmp_path: Path) -> None:
    texts = ["tiny", "a normal document", "\x00\x01\x02\x03 binary-ish", "a normal document"]
    path = _write(tmp_path / "f.jsonl", _jsonl(texts))
    skips = SkipCounter(strict=True)  # filters are choices, not errors: never stop a run
    filters = DocumentFilter(min_chars=5, max_nontext_fraction=0.2, dedup=True)
    got = list(iter_documents(SourceConfig(str(path)), "train", skips, filters=filters))
    assert got == ["a normal document"]
    assert skips.counts == {
        "filtered: shorter than 5 chars": 1,
        "filtered: over 0.2 non-text chars": 1,
        "filtered: exact duplicate": 1,
    }


# ---------------------------------------------------------------- sharding across readers
def _uneven_folder(folder: Path) -> list[str]:
    """Files of 1, 7 and 12 documents (jsonl, .gz, .zst) and 2 text files: 22 in all."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for name, count, seed in (("a.jsonl", 1, 10), ("b.jsonl.gz", 7, 11), ("c.jsonl.zst", 12, 12)):
        docs = _docs(count, seed)
        _write(folder / name, _jsonl(docs))
        texts += docs
    for index, doc in enumerate(_docs(2, 13)):
        _write(folder / f"d{index}.txt", doc.encode())
        texts.append(doc)
    return texts


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_document_is_read_exactly_once_across_ranks_and_workers(
    tmp_path: Path, world_size: int, num_workers: int
) -> None:
    texts = _uneven_folder(tmp_path / "data")
    bad = tmp_path / "data" / "e.jsonl"
    bad.write_bytes(_jsonl(["bad neighbours"]) + b"{oops\n" + b'{"text": 7}\n')
    texts.append("bad neighbours")
    source = SourceConfig(str(tmp_path / "data"))
    seen: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for epoch in (0, 1):  # each epoch has its own file order; coverage holds in every one
        seen.clear()
        for rank in range(world_size):
            for worker in range(max(num_workers, 1)):
                reader = Reader.of(rank, world_size, worker, num_workers)
                skips = SkipCounter(strict=False)
                seen.update(iter_documents(source, "train", skips, epoch=epoch, reader=reader))
                skipped.update(skips.counts)
        assert seen == Counter(texts)  # no document lost, none read twice
    assert skipped == {"malformed JSON": 2, "field 'text' is not a string": 2}  # once per epoch


# ---------------------------------------------------------------- prepared shards
def _prepare(
    tokenizer: Tokenizer, corpus: Path, out: Path, **data: Any
) -> tuple[DataConfig, list[SourceConfig]]:
    sources = [
        SourceConfig(str(corpus / "train.jsonl"), weight=3.0, name="a"),
        SourceConfig(str(corpus / "validation.jsonl"), weight=1.0, name="b"),
    ]
    config = DataConfig(seq_len=16, train=sources, validation=sources[1:], **data)
    prepare_shards(config, tokenizer, out, SkipCounter(strict=True))
    return DataConfig(seq_len=16, train=sources, validation=sources[1:], prepared=str(out)), sources


def test_shards_decode_back_to_the_original_text(tokenizer: Tokenizer, tmp_path: Path) -> None:
    texts = _uneven_folder(tmp_path / "data")
    source = SourceConfig(str(tmp_path / "data"), name="mixed")
    config = DataConfig(train=[source], validation=[source], shuffle_seed=3)
    metadata = prepare_shards(config, tokenizer, tmp_path / "shards", SkipCounter(True))
    assert metadata["fingerprint"] == {
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": 320,
        "special_ids": {"pad": 0, "bos": 2, "eos": 3},
        "dtype": "uint16",
    }
    for split in ("train", "validation"):
        (entry,) = metadata["splits"][split]
        assert [Path(f).name for f, _ in entry["files"]] == sorted(
            Path(f).name for f, _ in entry["files"]
        )
        assert all(size > 0 for _, size in entry["files"])
        shard = ShardSource(tmp_path / "shards", entry, np.dtype(np.uint16))
        assert shard.tokens.dtype == np.uint16 and len(shard) == len(texts)
        decoded = []
        for index in range(len(shard)):
            tokens = shard.document(index).tolist()
            assert tokens[-1] == tokenizer.eos_id and tokenizer.eos_id not in tokens[:-1]
            decoded.append(tokenizer.decode(tokens[:-1]))
        order = iter_documents(source, split, SkipCounter(True), shuffle_seed=3)
        assert decoded == list(order)  # the epoch-0 order, token for token
    assert sorted(decoded) == sorted(texts)
    assert token_dtype(320) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_fingerprint_or_source_mismatch_is_a_clear_error(
    tokenizer: Tokenizer, corpus: Path, tmp_path: Path
) -> None:
    config, sources = _prepare(tokenizer, corpus, tmp_path / "shards")
    other = train_tokenizer(iter_documents(sources[1], "train", SkipCounter(False)), 330)
    with pytest.raises(DataError, match="prepared with a different tokenizer: tokenizer_sha256"):
        build_packed_sequences(sources, "train", other, config, SkipCounter(False), True)
    config.ignore_fingerprint = True  # the explicit override
    build_packed_sequences(sources, "train", other, config, SkipCounter(False), True)
    config.ignore_fingerprint = False
    renamed = [SourceConfig(sources[0].path, name="renamed")]
    with pytest.raises(DataError, match="no prepared train source named 'renamed'"):
        build_packed_sequences(renamed, "train", tokenizer, config, SkipCounter(False), True)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(Path(sources[1].path).read_bytes())
    moved = DataConfig(
        seq_len=16, train=[SourceConfig(str(copy), name="b")], prepared=config.prepared
    )
    with pytest.raises(DataError, match="was prepared from"):
        build_packed_sequences(moved.train, "train", tokenizer, moved, SkipCounter(False), True)
    grown = tmp_path / "grown"
    (grown / "x.jsonl").parent.mkdir()
    (grown / "x.jsonl").write_bytes(_jsonl(_docs(3, 5)))
    grown_config, _ = _prepare_one(tokenizer, grown, tmp_path / "grown_shards")
    with (grown / "x.jsonl").open("ab") as handle:
        handle.write(_jsonl(["one more"]))
    with pytest.raises(DataError, match="changed since prepare"):
        build_packed_sequences(
            grown_config.train, "train", tokenizer, grown_config, SkipCounter(False), True
        )
    (tmp_path / "shards" / METADATA_FILE).unlink()
    with pytest.raises(DataError, match="run `scaletrain data prepare CONFIG`"):
        build_packed_sequences(sources, "train", tokenizer, config, SkipCounter(False), True)


def _prepare_one(tokenizer: Tokenizer, folder: Path, out: Path) -> tuple[DataConfig, SourceConfig]:
    source = SourceConfig(str(folder), name="x")
    prepare_shards(
        DataConfig(train=[source], validation=[source]), tokenizer, out, SkipCounter(True)
    )
    return DataConfig(seq_len=16, train=[source], validation=[source], prepared=str(out)), source


# ---------------------------------------------------------------- mixture and resume
@pytest.mark.parametrize("prepared", [False, True], ids=["streaming", "prepared"])
def test_mixture_shares_hold_within_each_phase_of_the_schedule(
    tokenizer: Tokenizer, corpus: Path, tmp_path: Path, prepared: bool
) -> None:
    extra = tmp_path / "c.jsonl"
    extra.write_bytes(_jsonl(_docs(30, 21)))
    sources = [
        SourceConfig(str(corpus / "train.jsonl"), weight=5.0, name="a"),
        SourceConfig(str(corpus / "validation.jsonl"), weight=3.0, name="b"),
        SourceConfig(str(extra), weight=2.0, name="c"),
    ]
    schedule = [MixturePhase(after_tokens=30_000, weights={"a": 0.0, "c": 1.0})]  # b keeps 3
    config = DataConfig(seq_len=64, train=sources, validation=sources, mixture_schedule=schedule)
    if prepared:
        prepare_shards(config, tokenizer, tmp_path / "shards", SkipCounter(True))
        config.prepared = str(tmp_path / "shards")
    stream = build_packed_sequences(sources, "train", tokenizer, config, SkipCounter(False), True)
    assert isinstance(stream, PackedSequences)
    for _ in range(30_000 // 64):
        stream.next_sequence()
    first = stream.tokens_by_source()
    assert stream.phase == -1
    for name, share in zip("abc", (0.5, 0.3, 0.2), strict=True):
        assert first[name] / sum(first.values()) == pytest.approx(share, abs=0.02)
    for _ in range(30_000 // 64):
        stream.next_sequence()
    assert stream.phase == 0
    phase = [n - s for n, s in zip(stream.source_tokens, stream.phase_start_tokens, strict=True)]
    assert phase[0] == 0
    assert phase[1] / sum(phase) == pytest.approx(0.75, abs=0.02)


def _run(loaders: list[GlobalBatchLoader], steps: int) -> list[torch.Tensor]:
    """Global batches of `steps` steps, each the concatenation of every rank's micro-batches."""
    batches = []
    for _ in range(steps):
        per_rank = [torch.cat([x for x, _ in loader.next_batch()]) for loader in loaders]
        batches.append(torch.cat(per_rank))
    return batches


@pytest.mark.parametrize("prepared", [False, True], ids=["streaming", "prepared"])
def test_resume_equals_uninterrupted_on_same_and_other_world_sizes(
    tokenizer: Tokenizer, corpus: Path, tmp_path: Path, prepared: bool
) -> None:
    if prepared:
        config, sources = _prepare(tokenizer, corpus, tmp_path / "shards")
    else:
        sources = [
            SourceConfig(str(corpus / "train.jsonl"), weight=3.0, name="a"),
            SourceConfig(str(corpus / "validation.jsonl"), weight=1.0, name="b"),
        ]
        config = DataConfig(seq_len=16, train=sources)

    def world(size: int, micro: int) -> list[GlobalBatchLoader]:
        return [
            GlobalBatchLoader(
                build_packed_sequences(
                    sources, "train", tokenizer, config, SkipCounter(False), True
                ),
                global_batch_seqs=12,
                micro_batch_size=micro,
                rank=rank,
                world_size=size,
            )
            for rank in range(size)
        ]

    straight = _run(world(1, 4), 40)
    interrupted = world(2, 2)
    for expected, got in zip(straight[:25], _run(interrupted, 25), strict=True):
        assert expected.equal(got)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in interrupted]
    assert all(state == states[0] for state in states)  # global, not per rank
    for size, micro in ((2, 2), (3, 2), (1, 12)):
        config.num_workers = 0 if prepared else size - 1  # 1, 2 or 0 reader processes
        resumed = world(size, micro)
        for loader in resumed:
            loader.load_state_dict(states[0])
        for expected, got in zip(straight[25:], _run(resumed, 15), strict=True):
            assert expected.equal(got)


# ---------------------------------------------------------------- the CLI
def test_cli_data_prepare_writes_shards_training_can_read(
    tokenizer: Tokenizer, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.cli import main
    from tests.helpers import small_config

    tokenizer_path = tokenizer.save(tmp_path / "tok")
    raw = small_config(tmp_path / "run", corpus, tokenizer={"path": str(tokenizer_path)})
    raw["data"]["prepare_dir"] = str(tmp_path / "shards")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    assert main(["data", "prepare", str(config_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dtype"] == "uint16" and summary["tokens"]["train"] > 0
    metadata = json.loads((tmp_path / "shards" / METADATA_FILE).read_text())
    assert [e["name"] for e in metadata["splits"]["validation"]] == ["synthetic"]
    source = SourceConfig(raw["data"]["train"][0]["path"], name="synthetic")
    config = DataConfig(seq_len=64, train=[source], prepared=str(tmp_path / "shards"))
    stream = build_packed_sequences([source], "train", tokenizer, config, SkipCounter(True), True)
    assert stream.next_sequence() is not None
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_jsonl(["fine"]) + b"{broken\n")
    raw["data"]["train"] = [{"path": str(bad), "name": "bad"}]
    raw["data"]["strict"] = True
    config_path.write_text(yaml.safe_dump(raw))
    assert main(["data", "prepare", str(config_path)]) == 2
    assert capsys.readouterr().err.strip() == f"scaletrain: error: {bad}:2: malformed JSON"
    del raw["data"]["prepare_dir"]
    config_path.write_text(yaml.safe_dump(raw))
    assert main(["data", "prepare", str(config_path)]) == 2
    assert "data.prepare_dir" in capsys.readouterr().err


# ---------------------------------------------------------------- worker processes
@pytest.mark.parametrize("num_workers", [1, 2])
def test_worker_processes_give_the_single_process_stream(
    tokenizer: Tokenizer, tmp_path: Path, num_workers: int
) -> None:
    _uneven_folder(tmp_path / "data")
    (tmp_path / "data" / "e.jsonl").write_bytes(
        _jsonl(["dup", "dup"]) + b"{oops\n" + b'{"text": 7}\n' + _jsonl(["x" * 3000])
    )
    source = SourceConfig(str(tmp_path / "data"))

    def run(workers: int, strict: bool = False) -> tuple[list[list[int]], dict[str, int]]:
        config = DataConfig(seq_len=16, num_workers=workers, dedup=True, max_doc_tokens=500)
        skips = SkipCounter(strict)
        stream = build_packed_sequences([source], "train", tokenizer, config, skips, loop=True)
        sequences = [stream.next_sequence().tolist() for _ in range(300)]  # type: ignore[union-attr]
        return sequences, dict(skips.counts)

    expected_sequences, expected_counts = run(0)
    assert expected_counts["malformed JSON"] >= 1 and expected_counts["filtered: exact duplicate"]
    assert expected_counts["document longer than 500 tokens"] >= 1
    assert run(num_workers) == (expected_sequences, expected_counts)
    with pytest.raises(DataError, match=r"e\.jsonl:3: malformed JSON$"):
        run(num_workers, strict=True)


def test_document_segments_mark_boundaries_for_document_masking() -> None:
    from data_pipeline.packing import document_segments

    eos = 3
    inputs = torch.tensor([[5, 6, 3, 7, 8, 9, 3, 4], [3, 5, 5, 5, 3, 3, 6, 6]])
    segments, positions = document_segments(inputs, eos)
    assert segments.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 2, 3, 3]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 0, 0, 1]]


def test_parquet_bad_values_are_counted_or_stop_strict(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    table = pa.table({"text": ["good one", None, "  ", "good two"], "n": [1, 2, 3, 4]})
    pq.write_table(table, path)
    skips = SkipCounter(strict=False)
    assert list(iter_documents(SourceConfig(str(path)), "train", skips)) == ["good one", "good two"]
    assert skips.counts == {"missing field 'text'": 1, "empty document": 1}
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'text'$"):
        list(iter_documents(SourceConfig(str(path)), "train", SkipCounter(strict=True)))
    numbers = SourceConfig(str(path), text_field="n")
    with pytest.raises(DataError, match=rf"^{path}:1: field 'n' is not a string$"):
        list(iter_documents(numbers, "train", SkipCounter(strict=True)))
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents(SourceConfig(str(path), text_field="body"), "train", skips))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_over_prepared_shards_each_rank_reads_only_its_own_tokens(
    tokenizer: Tokenizer, corpus: Path, tmp_path: Path, world_size: int
) -> None:
    config, sources = _prepare(tokenizer, corpus, tmp_path / "shards")
    eager = build_packed_sequences(sources, "train", tokenizer, config, SkipCounter(False), True)
    eager.random_access = False  # the token-buffer path: the reference stream
    expected = [eager.next_sequence() for _ in range(20 * 12)]
    read_by_rank = []
    got: list[torch.Tensor] = []
    loaders = []
    for rank in range(world_size):
        stream = build_packed_sequences(
            sources, "train", tokenizer, config, SkipCounter(False), True
        )
        assert stream.random_access
        read = [0]
        for source_stream in stream.streams:
            original = source_stream.read_tokens  # type: ignore[attr-defined]

            def counting(
                doc: int, start: int, end: int, original: Any = original, read: list[int] = read
            ) -> list[int]:
                read[0] += end - start
                tokens: list[int] = original(doc, start, end)
                return tokens

            source_stream.read_tokens = counting  # type: ignore[attr-defined]
        read_by_rank.append(read)
        loaders.append(GlobalBatchLoader(stream, 12, 2, rank, world_size))
    for _ in range(20):
        for loader in loaders:
            got += [row for x, y in loader.next_batch() for row in torch.cat([x, y[:, -1:]], 1)]
    assert all(a.equal(b) for a, b in zip(expected, got, strict=True))
    # every rank reads just its own sequences (seq_len + 1 tokens each), nobody else's
    assert [r[0] for r in read_by_rank] == [20 * 12 // world_size * 17] * world_size


def test_prepare_with_worker_processes_writes_identical_shards(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    _uneven_folder(tmp_path / "data")
    (tmp_path / "data" / "e.jsonl").write_bytes(
        _jsonl(["dup", "dup"]) + b"{oops\n" + b'{"text": 7}\n' + _jsonl(["x" * 3000])
    )
    source = SourceConfig(str(tmp_path / "data"), name="mixed")
    outputs = []
    for workers in (0, 2):
        config = DataConfig(
            train=[source], validation=[source], num_workers=workers, dedup=True, max_doc_tokens=500
        )
        out = tmp_path / f"shards{workers}"
        metadata = prepare_shards(config, tokenizer, out, SkipCounter(False))
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.*")}
        outputs.append((files, metadata["skipped_records"]))
    assert outputs[0] == outputs[1]
    assert outputs[0][1]["malformed JSON"] == 2 and outputs[0][1]["filtered: exact duplicate"] == 2
    assert outputs[0][1]["document longer than 500 tokens"] == 2


def test_prepare_dedups_across_the_sources_of_a_split(tokenizer: Tokenizer, tmp_path: Path) -> None:
    first = _write(tmp_path / "a.jsonl", _jsonl(["shared text", "only in a"]))
    second = _write(tmp_path / "b.jsonl", _jsonl(["only in b", "shared text"]))
    sources = [SourceConfig(str(first), name="a"), SourceConfig(str(second), name="b")]
    config = DataConfig(train=sources, validation=sources[:1], dedup=True)
    metadata = prepare_shards(config, tokenizer, tmp_path / "shards", SkipCounter(True))
    assert [e["documents"] for e in metadata["splits"]["train"]] == [2, 1]
    assert metadata["skipped_records"] == {"filtered: exact duplicate": 1}


def test_hub_source_streams_a_local_dataset_folder(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    _write(tmp_path / "ds" / "train.jsonl", _jsonl(["a doc"]) + b'{"text": 5}\n' + _jsonl(["b"]))
    source = SourceConfig(f"hf:{tmp_path / 'ds'}")
    skips = SkipCounter(strict=False)
    assert list(iter_documents(source, "train", skips)) == ["a doc", "b"]
    assert skips.counts == {"field 'text' is not a string": 1}
    halves = [
        iter_documents(source, "train", SkipCounter(False), reader=Reader(i, 2)) for i in (0, 1)
    ]
    assert [list(h) for h in halves] == [["a doc", "b"], []]
    with pytest.raises(DataError, match=r"#2: field 'text' is not a string$"):
        list(iter_documents(source, "train", SkipCounter(strict=True)))
