"""Pre-tokenized, memory-mapped shards: `scaletrain data prepare` writes them, training reads them.

Layout of a prepared folder::

    metadata.json                  format, fingerprint, per-source documents/tokens/files
    train/<name>.tokens            every document's tokens + EOS, back to back (uint16/uint32)
    train/<name>.index.npy         int64 document boundaries: document i = tokens[o[i]:o[i+1]]
    validation/<name>.tokens ...

The fingerprint (tokenizer SHA-256, vocab size, special ids, dtype) and the source files with
their sizes are checked when training opens the shards; a mismatch is a clear error unless
`data.ignore_fingerprint` is set. `metadata.json` is written last, so a folder without it is
an incomplete prepare. Documents are read by index (O(1) random access), so resuming needs
no replay: the state is the same (epoch, documents consumed) as the streaming path's.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import DocumentFilter, SkipCounter, iter_records, source_files
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.workers import WorkerJob, WorkerPool

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ENCODE_BATCH_DOCS = 256


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """uint16 while every id fits, uint32 beyond 65,536 pieces."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict[str, Any]:
    """What must match between the shards and the tokenizer that training uses."""
    return {
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "special_ids": {
            "pad": tokenizer.pad_id,
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
        },
        "dtype": token_dtype(tokenizer.vocab_size).name,
    }


def _files_with_sizes(source: SourceConfig, split: str, config: DataConfig) -> list[list[Any]]:
    files = source_files(source, split, config.builtin_validation_percent)
    return [[file, os.path.getsize(file)] for file in files]


def _file_stem(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _documents(
    source: SourceConfig,
    split: str,
    tokenizer: Tokenizer,
    config: DataConfig,
    skips: SkipCounter,
    filters: DocumentFilter,
) -> Iterator[tuple[str, str, np.ndarray[Any, Any] | None]]:
    """(where, text, tokens or None) of the good documents, in the epoch-0 order; with
    `data.num_workers`, read and tokenized by worker processes (same order and counts)."""
    if config.num_workers == 0:
        for where, text in iter_records(
            source, split, skips, 0, config.shuffle_seed, config.builtin_validation_percent
        ):
            yield where, text, None
        return
    job = WorkerJob(
        source,
        split,
        0,
        config.shuffle_seed,
        config.builtin_validation_percent,
        tokenize_from=0,
        send_texts=filters.active,
    )
    for outcome in WorkerPool(job, tokenizer, config.num_workers):
        for where, reason in outcome.skips:
            skips.skip(where, reason)
        if outcome.is_record and outcome.text is not None:
            yield outcome.where, outcome.text, outcome.tokens


def _write_source(
    source: SourceConfig,
    split: str,
    folder: Path,
    tokenizer: Tokenizer,
    config: DataConfig,
    skips: SkipCounter,
    filters: DocumentFilter,
) -> dict[str, Any]:
    """Tokenize one source into `folder`; return its metadata entry."""
    dtype = token_dtype(tokenizer.vocab_size)
    stem = _file_stem(source.label)
    tokens_path, index_path = folder / f"{stem}.tokens", folder / f"{stem}.index.npy"
    limit = config.max_doc_tokens
    offsets = [0]
    pending: list[tuple[str, str, np.ndarray[Any, Any] | None]] = []

    def flush(handle: Any) -> None:
        untokenized = [i for i, (_, _, tokens) in enumerate(pending) if tokens is None]
        encoded = tokenizer.encode_batch([pending[i][1] for i in untokenized])
        by_index = dict(zip(untokenized, encoded, strict=True))
        for i, (where, _, tokens) in enumerate(pending):
            ids = by_index[i] if tokens is None else tokens.tolist()
            if limit and len(ids) > limit:
                skips.skip(where, f"document longer than {limit} tokens")
                continue
            ids.append(tokenizer.eos_id)
            np.asarray(ids, dtype=dtype).tofile(handle)
            offsets.append(offsets[-1] + len(ids))
        pending.clear()

    with tokens_path.open("wb") as handle:
        for where, text, tokens in _documents(source, split, tokenizer, config, skips, filters):
            reason = filters.reason_to_drop(text)
            if reason is not None:
                skips.drop(reason)
                continue
            pending.append((where, text, tokens))
            if len(pending) >= ENCODE_BATCH_DOCS:
                flush(handle)
        flush(handle)
    np.save(index_path, np.asarray(offsets, dtype=np.int64))
    if len(offsets) == 1:
        raise DataError(f"{source.path}: source yields no usable documents")
    return {
        "name": source.label,
        "path": source.path,
        "text_field": source.text_field,
        "documents": len(offsets) - 1,
        "tokens": offsets[-1],
        "tokens_file": tokens_path.relative_to(folder.parent).as_posix(),
        "index_file": index_path.relative_to(folder.parent).as_posix(),
        "files": _files_with_sizes(source, split, config),
    }


def prepare_shards(
    config: DataConfig,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    skips: SkipCounter,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Tokenize `config.train` and `config.validation` into memory-mapped shards in `out_dir`."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / METADATA_FILE).unlink(missing_ok=True)  # incomplete until rewritten at the end
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, sources in (("train", config.train), ("validation", config.validation)):
        folder = root / split
        folder.mkdir(exist_ok=True)
        splits[split] = []
        filters = DocumentFilter.from_config(config)  # dedup spans every source of the split
        for source in sources:
            started = time.perf_counter()
            entry = _write_source(source, split, folder, tokenizer, config, skips, filters)
            elapsed = time.perf_counter() - started
            log(
                f"{split}/{entry['name']}: {entry['documents']:,} documents, "
                f"{entry['tokens']:,} tokens ({entry['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)"
            )
            splits[split].append(entry)
    metadata = {
        "format_version": FORMAT_VERSION,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "filters": {
            "min_doc_chars": config.min_doc_chars,
            "max_nontext_fraction": config.max_nontext_fraction,
            "dedup": config.dedup,
            "max_doc_tokens": config.max_doc_tokens,
        },
        "skipped_records": dict(skips.counts),
        "splits": splits,
    }
    tmp = root / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2) + "\n")
    tmp.replace(root / METADATA_FILE)
    return metadata


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a prepared folder, or a DataError saying how to make one."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: not found (an unfinished or missing prepare; run `scaletrain data prepare CONFIG`)"
        )
    try:
        metadata: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: shard format {metadata.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return metadata


def check_fingerprint(metadata: dict[str, Any], tokenizer: Tokenizer, where: str) -> None:
    """Raise a DataError naming every field where the shards and `tokenizer` disagree."""
    expected = tokenizer_fingerprint(tokenizer)
    found = metadata["fingerprint"]
    diffs = [
        f"{key} {found.get(key)!r} in shards vs {value!r} for the tokenizer"
        for key, value in expected.items()
        if found.get(key) != value
    ]
    if diffs:
        raise DataError(
            f"{where}: prepared with a different tokenizer: {'; '.join(diffs)} "
            "(re-run `scaletrain data prepare`, or set data.ignore_fingerprint=true)"
        )


class ShardSource:
    """One source's prepared documents, memory-mapped, addressable by document index."""

    def __init__(self, root: Path, entry: dict[str, Any], dtype: np.dtype[Any]) -> None:
        self.entry = entry
        tokens_path = root / entry["tokens_file"]
        expected_bytes = int(entry["tokens"]) * dtype.itemsize
        if not tokens_path.is_file() or tokens_path.stat().st_size != expected_bytes:
            raise DataError(
                f"{tokens_path}: missing or truncated (expected {expected_bytes:,} bytes)"
            )
        self.tokens = np.memmap(tokens_path, dtype=dtype, mode="r")
        self.offsets = np.load(root / entry["index_file"], mmap_mode="r")
        if len(self.offsets) != int(entry["documents"]) + 1:
            raise DataError(f"{root / entry['index_file']}: document count does not match")

    def __len__(self) -> int:
        """The number of documents."""
        return len(self.offsets) - 1

    def document(self, index: int) -> np.ndarray[Any, Any]:
        """Document `index`'s tokens, ending with EOS (a view on the memory map)."""
        return self.tokens[int(self.offsets[index]) : int(self.offsets[index + 1])]


class ShardSourceStream:
    """A `SourceStream` over prepared documents: same state, but resuming is O(1).

    Training visits each epoch's documents in a permutation seeded by (shuffle_seed, epoch,
    source name); validation keeps the prepared order.
    """

    def __init__(
        self,
        source: SourceConfig,
        shard: ShardSource,
        split: str,
        shuffle_seed: int,
        loop: bool,
    ) -> None:
        self.source = source
        self.shard = shard
        self.split = split
        self.shuffle_seed = shuffle_seed
        self.loop = loop
        self.epoch = 0
        self.docs_consumed = 0
        self._order: np.ndarray[Any, Any] | None = None

    def _epoch_order(self) -> np.ndarray[Any, Any]:
        if self._order is None:
            if self.split == "train":
                seed = [self.shuffle_seed, self.epoch, zlib.crc32(self.source.label.encode())]
                self._order = np.random.default_rng(seed).permutation(len(self.shard))
            else:
                self._order = np.arange(len(self.shard))
        return self._order

    def next_document_span(self) -> tuple[int, int] | None:
        """(document index, length incl. EOS) of the next document; its tokens are not read."""
        if self.docs_consumed >= len(self.shard):
            if not self.loop:
                return None
            self.epoch += 1
            self.docs_consumed = 0
            self._order = None
        index = int(self._epoch_order()[self.docs_consumed])
        self.docs_consumed += 1
        return index, int(self.shard.offsets[index + 1] - self.shard.offsets[index])

    def read_tokens(self, document: int, start: int, end: int) -> list[int]:
        """Tokens [start, end) of document `document` (read from the memory map)."""
        return self.shard.document(document)[start:end].tolist()

    def next_document(self) -> list[int] | None:
        """The next document's tokens (ending with EOS), or None when a non-looping source ends."""
        span = self.next_document_span()
        return None if span is None else self.read_tokens(span[0], 0, span[1])

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and documents consumed in it."""
        return {"epoch": self.epoch, "docs_consumed": self.docs_consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Jump to a saved position (O(1): documents are read by index)."""
        self.epoch = int(state["epoch"])
        self.docs_consumed = int(state["docs_consumed"])
        self._order = None


def open_prepared_streams(
    folder: str | os.PathLike[str],
    sources: Sequence[SourceConfig],
    split: str,
    tokenizer: Tokenizer,
    config: DataConfig,
    loop: bool,
) -> Iterator[ShardSourceStream]:
    """Streams over the prepared shards of `sources`, after the fingerprint checks."""
    root = Path(folder)
    metadata = read_metadata(root)
    where = str(root / METADATA_FILE)
    if not config.ignore_fingerprint:
        check_fingerprint(metadata, tokenizer, where)
    dtype = np.dtype(metadata["fingerprint"]["dtype"])
    entries = {entry["name"]: entry for entry in metadata["splits"].get(split, [])}
    for source in sources:
        entry = entries.get(source.label)
        if entry is None:
            raise DataError(
                f"{where}: no prepared {split} source named {source.label!r} "
                f"(prepared: {', '.join(entries) or 'none'}); re-run `scaletrain data prepare`"
            )
        if not config.ignore_fingerprint:
            if entry["path"] != source.path:
                raise DataError(
                    f"{where}: {split} source {source.label!r} was prepared from "
                    f"{entry['path']!r}, the config says {source.path!r} "
                    "(re-run `scaletrain data prepare`, or set data.ignore_fingerprint=true)"
                )
            current = _files_with_sizes(source, split, config)
            if current != entry["files"]:
                raise DataError(
                    f"{where}: the files of {split} source {source.label!r} changed since "
                    "prepare (names or sizes differ; re-run `scaletrain data prepare`, "
                    "or set data.ignore_fingerprint=true)"
                )
        yield ShardSourceStream(
            source, ShardSource(root, entry, dtype), split, config.shuffle_seed, loop
        )
