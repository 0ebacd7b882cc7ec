"""Streaming over logical shards: every record read once across ranks x workers, the same global
batches on any world size, mixtures, and resume across world sizes.

Ranks are simulated in process: one `ShardedBatchLoader(rank, world_size)` per rank, each with
its own passes over the files (and its own worker processes when `num_workers` > 0).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from data_pipeline.config import DataConfig, MixturePhase, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sharded import ShardedBatchLoader, sum_counts
from data_pipeline.sources import SkipCounter, iter_documents, iter_outcomes
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from tests.helpers import synthetic_document

GLOBAL_BATCH = 12  # sequences: splits over 1, 2, 3 and 4 ranks


@pytest.fixture(scope="module")
def tokenizer(corpus: Path) -> Tokenizer:
    texts = iter_documents(SourceConfig(str(corpus / "train.jsonl")), "train", SkipCounter(False))
    return train_tokenizer(texts, vocab_size=320)


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"# doc {seed}-{i}\n" + synthetic_document(rng) for i in range(n)]


def _uneven_folder(folder: Path) -> list[str]:
    """5 files of 1, 7, 31, 2 and 13 documents (jsonl, .gz, txt) plus 3 bad records: no file
    count or size divides the 12 logical shards."""
    import gzip

    folder.mkdir(parents=True)
    texts: list[str] = []
    for name, count, seed in (("a.jsonl", 1, 1), ("b.jsonl.gz", 7, 2), ("c.jsonl", 31, 3)):
        docs = _docs(count, seed)
        data = _jsonl(docs)
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        texts += docs
    for index, doc in enumerate(_docs(2, 4)):
        (folder / f"d{index}.txt").write_text(doc)
        texts.append(doc)
    docs = _docs(13, 5)
    (folder / "e.jsonl").write_bytes(
        _jsonl(docs[:6]) + b"{oops\n" + b'{"text": 7}\n' + _jsonl(docs[6:]) + b'{"body": "x"}\n'
    )
    return texts + docs


def _world(
    sources: list[SourceConfig],
    tokenizer: Tokenizer,
    config: DataConfig,
    world_size: int,
    loop: bool = True,
    strict: bool = False,
) -> list[ShardedBatchLoader]:
    micro = GLOBAL_BATCH // world_size // 2 or 1
    return [
        ShardedBatchLoader(
            sources,
            tokenizer,
            config,
            SkipCounter(strict),
            GLOBAL_BATCH,
            micro,
            rank,
            world_size,
            loop=loop,
        )
        for rank in range(world_size)
    ]


def _steps(loaders: list[ShardedBatchLoader], steps: int) -> list[torch.Tensor]:
    """Global batches (inputs), each the concatenation of every rank's micro-batches."""
    return [
        torch.cat([x for loader in loaders for x, _ in loader.next_batch()]) for _ in range(steps)
    ]


def _global_state(loaders: list[ShardedBatchLoader]) -> dict[str, Any]:
    """What the trainer saves: every rank's shards, gathered (here: in process), via JSON."""
    parts = [loader.local_state() for loader in loaders]
    state = loaders[0].state_dict(lambda _: parts)
    return json.loads(json.dumps(state))  # type: ignore[no-any-return]


def _documents(tokens: list[int], eos: int, tokenizer: Tokenizer) -> list[str]:
    """The documents of a shard's token stream (each ends with EOS)."""
    documents, current = [], []
    for token in tokens:
        if token == eos:
            documents.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert not current, "a shard's stream ends with a whole document"
    return documents


# ---------------------------------------------------------------- exactly once
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_document_is_read_exactly_once_across_ranks_and_workers(
    tokenizer: Tokenizer, tmp_path: Path, world_size: int, num_workers: int
) -> None:
    texts = _uneven_folder(tmp_path / "data")
    source = SourceConfig(str(tmp_path / "data"))
    config = DataConfig(seq_len=16, num_workers=num_workers, shuffle_seed=world_size)
    loaders = _world([source], tokenizer, config, world_size, loop=False)
    streams: dict[int, list[int]] = {}
    for loader in loaders:
        streams.update(loader.drain())
    assert sorted(streams) == list(range(GLOBAL_BATCH))  # every shard, on exactly one rank
    seen = Counter(d for s in streams.values() for d in _documents(s, tokenizer.eos_id, tokenizer))
    assert seen == Counter(texts)  # no document lost, none read twice
    skipped = sum_counts([dict(loader.skips.counts) for loader in loaders])
    assert skipped == {
        "malformed JSON": 1,
        "field 'text' is not a string": 1,
        "missing field 'text'": 1,
    }
    # Records parsed: each rank parsed its own shards' records and no others.
    records = len(list(iter_outcomes(source, "train", SkipCounter(False), shuffle_seed=world_size)))
    assert records == len(texts) + 3
    per_rank = GLOBAL_BATCH // world_size
    expected = [
        sum(
            1 for i in range(records) if rank * per_rank <= i % GLOBAL_BATCH < (rank + 1) * per_rank
        )
        for rank in range(world_size)
    ]
    assert [loader.records_read() for loader in loaders] == expected
    for loader in loaders:
        loader.close()


def test_a_rank_tokenizes_only_its_own_documents(tokenizer: Tokenizer, corpus: Path) -> None:
    source = SourceConfig(str(corpus / "train.jsonl"))
    documents = list(iter_documents(source, "train", SkipCounter(False)))
    config = DataConfig(seq_len=16)
    encoded: list[list[str]] = []
    loaders = []
    for rank in range(2):
        own = Tokenizer.from_files(tokenizer.files())  # each rank its own, counting what it encodes
        calls: list[str] = []
        original = own.encode

        def counting(text: str, calls: list[str] = calls, original: Any = original) -> list[int]:
            calls.append(text)
            tokens: list[int] = original(text)
            return tokens

        own.encode = counting  # type: ignore[method-assign]
        encoded.append(calls)
        loaders += _world([source], own, config, 2, loop=False)[rank : rank + 1]
    for loader in loaders:
        loader.drain()
    assert not set(encoded[0]) & set(encoded[1])
    assert Counter(encoded[0] + encoded[1]) == Counter(documents)  # each encoded once
    assert abs(len(encoded[0]) - len(encoded[1])) <= len(documents) // 10


# ---------------------------------------------------------------- the same stream everywhere
def test_global_batches_are_the_same_on_any_world_size_and_worker_count(
    tokenizer: Tokenizer, corpus: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "c.jsonl"
    extra.write_bytes(_jsonl(_docs(30, 21)))
    sources = [
        SourceConfig(str(corpus / "train.jsonl"), weight=3.0, name="a"),
        SourceConfig(str(corpus / "validation.jsonl"), weight=1.0, name="b"),
        SourceConfig(str(extra), weight=1.0, name="c"),
    ]
    config = DataConfig(seq_len=16, train=sources)
    expected = _steps(_world(sources, tokenizer, config, 1), 30)
    for world_size, workers in ((2, 0), (3, 2), (4, 1)):
        config.num_workers = workers
        loaders = _world(sources, tokenizer, config, world_size)
        got = _steps(loaders, 30)
        assert all(a.equal(b) for a, b in zip(expected, got, strict=True)), (world_size, workers)
        for loader in loaders:
            loader.close()


def test_logical_shards_must_fit_the_batch_and_the_world(
    tokenizer: Tokenizer, corpus: Path
) -> None:
    source = SourceConfig(str(corpus / "train.jsonl"))
    with pytest.raises(DataError, match=r"data\.logical_shards: 5 must divide the 12"):
        _world([source], tokenizer, DataConfig(seq_len=16, logical_shards=5), 1)
    with pytest.raises(
        DataError, match=r"data\.logical_shards: 4 shards do not split evenly over 3"
    ):
        _world([source], tokenizer, DataConfig(seq_len=16, logical_shards=4), 3)
    # Fewer shards than sequences: each shard gives 12 / 4 = 3 consecutive sequences per batch.
    loaders = _world([source], tokenizer, DataConfig(seq_len=16, logical_shards=4), 2)
    assert [loader.shards for loader in loaders] == [[0, 1], [2, 3]]
    batch = _steps(loaders, 2)
    assert batch[0].shape == (12, 16)
    single = _world([source], tokenizer, DataConfig(seq_len=16, logical_shards=4), 1)
    assert all(a.equal(b) for a, b in zip(batch, _steps(single, 2), strict=True))


# ---------------------------------------------------------------- mixture
def test_mixture_shares_hold_within_each_phase_over_a_long_stream(
    tokenizer: Tokenizer, corpus: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "c.jsonl"
    extra.write_bytes(_jsonl(_docs(30, 21)))
    sources = [
        SourceConfig(str(corpus / "train.jsonl"), weight=5.0, name="a"),
        SourceConfig(str(corpus / "validation.jsonl"), weight=3.0, name="b"),
        SourceConfig(str(extra), weight=2.0, name="c"),
    ]
    schedule = [MixturePhase(after_tokens=60_000, weights={"a": 0.0, "c": 1.0})]  # b keeps 3
    config = DataConfig(seq_len=64, train=sources, mixture_schedule=schedule)
    loaders = _world(sources, tokenizer, config, 2)
    _steps(loaders, 60_000 // (GLOBAL_BATCH * 64))
    first = sum_counts([loader.tokens_by_source() for loader in loaders])
    for name, share in zip("abc", (0.5, 0.3, 0.2), strict=True):
        assert first[name] / sum(first.values()) == pytest.approx(share, abs=0.02)
    _steps(loaders, 60_000 // (GLOBAL_BATCH * 64))
    states = _global_state(loaders)["shards"].values()
    assert all(state["phase"] == 0 for state in states)
    phase = [0, 0, 0]
    for state in states:
        for index, (n, start) in enumerate(
            zip(state["source_tokens"], state["phase_start_tokens"], strict=True)
        ):
            phase[index] += n - start
    assert phase[0] == 0
    assert phase[1] / sum(phase) == pytest.approx(0.75, abs=0.02)


# ---------------------------------------------------------------- resume
def test_resume_equals_uninterrupted_on_same_and_other_world_sizes(
    tokenizer: Tokenizer, corpus: Path
) -> None:
    sources = [
        SourceConfig(str(corpus / "train.jsonl"), weight=1.0, name="a"),
        SourceConfig(str(corpus / "validation.jsonl"), weight=1.0, name="b"),  # wraps epochs
    ]
    config = DataConfig(seq_len=16, train=sources)
    straight = _steps(_world(sources, tokenizer, config, 2), 100)
    interrupted = _world(sources, tokenizer, config, 2)
    assert all(a.equal(b) for a, b in zip(straight, _steps(interrupted, 60), strict=False))
    state = _global_state(interrupted)
    assert sorted(map(int, state["shards"])) == list(range(GLOBAL_BATCH))
    assert max(s["sources"][1]["epoch"] for s in state["shards"].values()) >= 1
    for world_size, workers in ((2, 0), (1, 0), (3, 0), (1, 1), (3, 2)):
        config.num_workers = workers
        resumed = _world(sources, tokenizer, config, world_size)
        for loader in resumed:
            loader.load_state_dict(state)
        got = _steps(resumed, 40)
        assert all(a.equal(b) for a, b in zip(straight[60:], got, strict=True)), world_size
        for loader in resumed:
            loader.close()


@pytest.mark.parametrize(("first", "second"), [(2, 1), (2, 3)])
def test_resume_on_another_world_size_covers_exactly_the_remaining_tokens(
    tokenizer: Tokenizer, tmp_path: Path, first: int, second: int
) -> None:
    texts = _uneven_folder(tmp_path / "data")
    source = SourceConfig(str(tmp_path / "data"))
    config = DataConfig(seq_len=16)
    before = _world([source], tokenizer, config, first, loop=False)
    consumed: dict[int, list[int]] = {s: [] for s in range(GLOBAL_BATCH)}
    for _ in range(3):
        rows = torch.cat([torch.cat([x for x, _ in loader.next_batch()]) for loader in before])
        for shard, row in enumerate(rows):  # one sequence per shard, in shard order
            consumed[shard] += row.tolist()
    state = _global_state(before)
    skipped_before = sum_counts([dict(loader.skips.counts) for loader in before])
    after = _world([source], tokenizer, config, second, loop=False)
    rest: dict[int, list[int]] = {}
    for loader in after:
        loader.load_state_dict(state)
        rest.update(loader.drain())
    documents = Counter(
        d
        for shard in range(GLOBAL_BATCH)
        for d in _documents(consumed[shard] + rest[shard], tokenizer.eos_id, tokenizer)
    )
    assert documents == Counter(texts)  # each token exactly once, before or after the resume
    skipped = sum_counts([skipped_before] + [dict(loader.skips.counts) for loader in after])
    assert skipped == {
        "malformed JSON": 1,
        "field 'text' is not a string": 1,
        "missing field 'text'": 1,
    }


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_mode_stops_with_the_bad_record_on_any_rank(
    tokenizer: Tokenizer, tmp_path: Path, num_workers: int
) -> None:
    _uneven_folder(tmp_path / "data")
    source = SourceConfig(str(tmp_path / "data"))
    config = DataConfig(seq_len=16, num_workers=num_workers)
    bad = str(tmp_path / "data" / "e.jsonl")
    errors = []
    for loader in _world([source], tokenizer, config, 2, loop=False, strict=True):
        try:
            loader.drain()
        except DataError as exc:
            errors.append(str(exc))
        loader.close()
    reasons = {f"{bad}:7: malformed JSON", f"{bad}:8: field 'text' is not a string"}
    reasons.add(f"{bad}:16: missing field 'text'")
    assert errors and set(errors) <= reasons


def test_long_documents_and_filters_are_counted_per_shard(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "x.jsonl").write_bytes(_jsonl([*_docs(20, 8), "tiny", "word " * 3000, *_docs(20, 9)]))
    source = SourceConfig(str(folder))
    config = DataConfig(seq_len=16, max_doc_tokens=1000, min_doc_chars=10)
    loaders = _world([source], tokenizer, config, 3, loop=False)
    streams: dict[int, list[int]] = {}
    for loader in loaders:
        streams.update(loader.drain())
    seen = Counter(d for s in streams.values() for d in _documents(s, tokenizer.eos_id, tokenizer))
    assert seen == Counter(_docs(20, 8) + _docs(20, 9))
    assert sum_counts([dict(loader.skips.counts) for loader in loaders]) == {
        "filtered: shorter than 10 chars": 1,
        "document longer than 1000 tokens": 1,
    }


def test_workers_stop_with_the_loader_even_under_a_sigterm_handler(
    tokenizer: Tokenizer, corpus: Path
) -> None:
    """The trainer handles SIGTERM as "save and stop"; forked workers must not inherit that."""
    import signal

    source = SourceConfig(str(corpus / "train.jsonl"))
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        (loader,) = _world([source], tokenizer, DataConfig(seq_len=16, num_workers=2), 1)
        loader.next_batch()
        assert loader._workers is not None
        processes = loader._workers.processes
        loader.close()
        assert not any(process.is_alive() for process in processes)
        # The per-source worker pool of `data prepare` and validation, closed early.
        from data_pipeline.workers import WorkerJob, WorkerPool

        pool = WorkerPool(WorkerJob(source, "train", 0, 0, 2.0, 0), tokenizer, 2)
        next(iter(pool))
        pool.close()
        assert not any(process.is_alive() for process in pool.processes)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- through the CLI
@pytest.mark.slow
def test_two_ranks_with_workers_resume_on_one_rank_through_the_cli(
    tmp_path: Path, corpus: Path
) -> None:
    """torchrun, 2 ranks x 1 worker, crash after step 5; resume on 1 rank without workers: the
    losses equal the uninterrupted 1-rank run's, and the saved state holds every shard."""
    from tests.test_resilience import config_file, run, step_lines, train_cmd

    straight = config_file(tmp_path, corpus, "straight", train={"max_steps": 8})
    run(train_cmd(straight))
    expected = step_lines(tmp_path / "straight")
    config = config_file(
        tmp_path,
        corpus,
        "sharded",
        train={"max_steps": 8},
        checkpoint={"every": 4},
        data={**yaml_data(corpus), "num_workers": 1},
    )
    run(train_cmd(config, 2, "--fail-at-step", "5"), expect=1)
    state = json.loads(
        (tmp_path / "sharded/checkpoints/step_00000004/trainer_state.json").read_text()
    )
    shards = state["data"]["shards"]
    assert state["data"]["logical_shards"] == len(shards) == 8  # 512 tokens / 64 per sequence
    drawn = sum(n for s in shards.values() for n in s["source_tokens"])
    fed = 4 * 8 * 64  # 4 steps of 8 sequences of 64 inputs, from both ranks
    assert fed <= drawn <= fed + sum(len(s["buffer"]) for s in shards.values())
    lines = step_lines(tmp_path / "sharded")
    assert lines[3]["tokens_by_source"]["synthetic"] == drawn  # summed over the ranks
    result = run(train_cmd(config, 1, "--set", "data.num_workers=0"))
    assert "resumed from" in result.stderr
    resumed = step_lines(tmp_path / "sharded")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    bad = run(train_cmd(config, 1, "--set", "data.logical_shards=3"), expect=2)
    assert bad.stderr.strip().splitlines()[-1] == (
        "scaletrain: error: data.logical_shards: 3 must divide the 8 sequences of a global "
        "batch (0: one shard per sequence)"
    )


def yaml_data(corpus: Path) -> dict[str, Any]:
    """The `data` section of the small test config."""
    from tests.helpers import small_config

    data: dict[str, Any] = small_config(Path("unused"), corpus)["data"]
    return data
