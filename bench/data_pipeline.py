"""Throughput of the data pipeline: read + tokenize + pack, against raw sentencepiece encoding.

    python -m bench.data_pipeline [--megabytes 8] [--vocab-size 4096] [--seq-len 512]

Builds a jsonl corpus from the standard library's own sources (nothing is downloaded), trains
(or loads, with --tokenizer) a sentencepiece model, then times, in the same run and on the
same text:
  - raw sentencepiece: `encode` over the texts already in memory, one call per document;
  - the streaming pipeline (read jsonl, check, tokenize, pack into seq_len + 1 sequences)
    with data.num_workers = 0 (in process), 1 and 2;
  - the training loader over 8 logical shards (`ShardedBatchLoader`) for as many steps as
    the corpus fills: one rank of one with 0 and 2 workers, and rank 0 of 4, which reads and
    tokenizes only its quarter of the records and feeds a quarter of each global batch;
  - `data prepare` (the same work, written to memory-mapped shards), and training reads from
    those shards.
Prints a Markdown table (for docs/BENCHMARKS.md) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.packing import GlobalBatchLoader, build_packed_sequences
from data_pipeline.sharded import ShardedBatchLoader
from data_pipeline.shards import prepare_shards
from data_pipeline.sources import SkipCounter, stdlib_files
from data_pipeline.tokenizer import Tokenizer, train_tokenizer


def build_corpus(folder: Path, megabytes: float) -> tuple[Path, list[str]]:
    """Standard-library files as jsonl documents, up to `megabytes` of text."""
    texts: list[str] = []
    size = 0
    for file in stdlib_files("train", 2.0):
        text = Path(file).read_text(encoding="utf-8")
        if not text.strip():
            continue
        texts.append(text)
        size += len(text.encode())
        if size >= megabytes * 2**20:
            break
    path = folder / "corpus.jsonl"
    with path.open("w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return path, texts


def time_pipeline(
    source: SourceConfig, tokenizer: Tokenizer, config: DataConfig
) -> tuple[float, int]:
    started = time.perf_counter()
    stream = build_packed_sequences(
        [source], "train", tokenizer, config, SkipCounter(False), loop=False
    )
    sequences = sum(1 for _ in stream)
    elapsed = time.perf_counter() - started
    return elapsed, sequences * config.seq_len


def time_sharded_rank(
    source: SourceConfig,
    tokenizer: Tokenizer,
    config: DataConfig,
    world_size: int,
    corpus_tokens: int,
) -> tuple[float, int]:
    """Rank 0's training loader (a global batch of 64 sequences) for as many
    steps as the corpus fills: the tokens it feeds its own model replica, which it alone
    reads and tokenizes (1/world_size of the records)."""
    loader = ShardedBatchLoader(
        [source], tokenizer, config, SkipCounter(False), 64, 64 // world_size, 0, world_size
    )
    steps = max(1, corpus_tokens // (64 * config.seq_len))
    started = time.perf_counter()
    for _ in range(steps):
        loader.next_batch()
    elapsed = time.perf_counter() - started
    loader.close()
    return elapsed, steps * (64 // world_size) * config.seq_len


def time_rank_of_world(
    source: SourceConfig, tokenizer: Tokenizer, config: DataConfig, world_size: int
) -> tuple[float, int]:
    """Rank 0's loader over shards: it skips the other ranks' sequences without reading them."""
    stream = build_packed_sequences(
        [source], "train", tokenizer, config, SkipCounter(False), loop=True
    )
    global_batch = 8 * world_size
    loader = GlobalBatchLoader(stream, global_batch, 8, rank=0, world_size=world_size)
    steps = max(1, stream.streams[0].shard.entry["tokens"] // (global_batch * config.seq_len))  # type: ignore[attr-defined]
    started = time.perf_counter()
    for _ in range(steps):
        loader.next_batch()
    return time.perf_counter() - started, steps * global_batch * config.seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.model to use")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, texts = build_corpus(folder, args.megabytes)
        mb = path.stat().st_size / 2**20
        if args.tokenizer:
            tokenizer = Tokenizer.load(args.tokenizer)
        else:
            tokenizer = train_tokenizer(iter(texts), args.vocab_size, max_sentences=100_000)
        rows: list[tuple[str, float, int]] = []

        started = time.perf_counter()
        raw_tokens = sum(len(tokenizer.encode(text)) + 1 for text in texts)
        rows.append(
            (
                "raw sentencepiece encode (texts in memory)",
                time.perf_counter() - started,
                raw_tokens,
            )
        )

        source = SourceConfig(str(path))
        for workers in (0, 1, 2):
            config = DataConfig(seq_len=args.seq_len, num_workers=workers)
            elapsed, tokens = time_pipeline(source, tokenizer, config)
            rows.append((f"pipeline read+tokenize+pack, {workers} workers", elapsed, tokens))

        for workers, world_size in ((0, 1), (2, 1), (0, 4)):
            # 8 shards of 8 sequences per step: a few MiB of stdlib files are only ~100-1000
            # documents, and every shard needs some of them.
            config = DataConfig(seq_len=args.seq_len, num_workers=workers, logical_shards=8)
            elapsed, tokens = time_sharded_rank(source, tokenizer, config, world_size, raw_tokens)
            rows.append(
                (
                    f"training loader, 8 logical shards, rank 0 of {world_size}, "
                    f"{workers} workers (tokens fed to its replica)",
                    elapsed,
                    tokens,
                )
            )

        config = DataConfig(seq_len=args.seq_len, train=[source], validation=[])
        started = time.perf_counter()
        metadata = prepare_shards(config, tokenizer, folder / "shards", SkipCounter(False))
        prepared_tokens = metadata["splits"]["train"][0]["tokens"]
        rows.append(
            (
                "data prepare (read+tokenize+write shards)",
                time.perf_counter() - started,
                prepared_tokens,
            )
        )
        config.num_workers = 2
        started = time.perf_counter()
        prepare_shards(config, tokenizer, folder / "shards2", SkipCounter(False))
        rows.append(
            (
                "data prepare, 2 workers",
                time.perf_counter() - started,
                prepared_tokens,
            )
        )
        config.num_workers = 0
        config.prepared = str(folder / "shards")
        elapsed, tokens = time_pipeline(source, tokenizer, config)
        rows.append(("training read from prepared shards (pack)", elapsed, tokens))
        elapsed, tokens = time_rank_of_world(source, tokenizer, config, world_size=4)
        rows.append(
            ("one rank of 4 over prepared shards (global tokens advanced)", elapsed, tokens)
        )

    raw_rate = rows[0][2] / rows[0][1]
    print(
        f"corpus: {len(texts)} documents, {mb:.1f} MiB jsonl, vocab {tokenizer.vocab_size}, seq_len {args.seq_len}"
    )
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    print()
    print("| what | seconds | tokens | tokens/s | vs raw encode |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, tokens in rows:
        rate = tokens / seconds
        print(f"| {name} | {seconds:.2f} | {tokens:,} | {rate:,.0f} | {rate / raw_rate:.2f}x |")
    print()
    print(json.dumps({name: round(tokens / seconds) for name, seconds, tokens in rows}))


if __name__ == "__main__":
    main()
