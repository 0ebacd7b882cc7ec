"""Document sources read through Hugging Face `datasets` in streaming mode.

A source yields plain-text documents. Bad records are counted by reason and skipped, or, with
`strict`, stop the run with `file:line: reason`. Nothing malformed reaches the tokenizer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_STDLIB = "builtin:stdlib"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd")

datasets.disable_progress_bars()


class SkipCounter:
    """Counts skipped records by reason; in strict mode raises on the first one instead."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.counts: Counter[str] = Counter()

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason}")
        self.counts[reason] += 1

    def total(self) -> int:
        return sum(self.counts.values())


def stdlib_files(
    split: str, validation_percent: float, skips: SkipCounter | None = None
) -> list[str]:
    """The standard library's .py files for `split`, sorted; the held-out split is by file hash."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if "site-packages" in relative.parts or "dist-packages" in relative.parts:
            continue
        bucket = int(hashlib.md5(str(relative).encode()).hexdigest(), 16) % 10_000
        in_validation = bucket < validation_percent * 100
        if in_validation != (split == "validation"):
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            if skips is not None:
                skips.skip(str(path), "invalid UTF-8")
            continue
        except OSError:
            if skips is not None:
                skips.skip(str(path), "unreadable file")
            continue
        files.append(str(path))
    if not files:
        raise DataError(f"{BUILTIN_STDLIB}: no Python source files found under {root}")
    return files


def _base_suffix(path: str) -> str:
    name = path.lower()
    for compression in COMPRESSION_SUFFIXES:
        if name.endswith(compression):
            name = name[: -len(compression)]
    return os.path.splitext(name)[1]


def resolve_local_files(path: str) -> list[str]:
    """A file, a glob or a folder (searched recursively) as a sorted list of data files."""
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = sorted(
            str(p)
            for p in Path(path).rglob("*")
            if p.is_file()
            and _base_suffix(str(p)) in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
        )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"{path}: no such file, folder or glob match")
    if not files:
        raise DataError(f"{path}: matched no data files")
    for file in files:
        if _base_suffix(file) not in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
            raise DataError(f"{file}: unsupported file type (use jsonl, json, parquet or txt)")
    return files


def _check_text(value: Any, where: str, field: str, skips: SkipCounter) -> str | None:
    if value is None:
        skips.skip(where, f"missing field '{field}'")
        return None
    if not isinstance(value, str):
        skips.skip(where, f"field '{field}' is not a string")
        return None
    try:
        value.encode("utf-8")  # surrogateescape'd bytes (invalid UTF-8 input) cannot encode
    except UnicodeEncodeError:
        skips.skip(where, "invalid UTF-8")
        return None
    if not value.strip():
        skips.skip(where, "empty document")
        return None
    return value


def _iter_jsonl(file: str, field: str, skips: SkipCounter) -> Iterator[str]:
    # Lines come through the `text` builder so that each bad line is found, counted and named
    # on its own; surrogateescape turns invalid bytes into markers that _check_text rejects.
    lines = datasets.load_dataset(
        "text",
        data_files=[file],
        split="train",
        streaming=True,
        encoding_errors="surrogateescape",
    )
    for line_no, row in enumerate(lines, start=1):
        line = row["text"]
        if not line.strip():
            continue
        where = f"{file}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skips.skip(where, "malformed JSON")
            continue
        if not isinstance(record, dict):
            skips.skip(where, "record is not a JSON object")
            continue
        text = _check_text(record.get(field), where, field, skips)
        if text is not None:
            yield text


def _iter_text_files(files: list[str], where: str, skips: SkipCounter) -> Iterator[str]:
    documents = datasets.load_dataset(
        "text",
        data_files=files,
        split="train",
        streaming=True,
        sample_by="document",
        encoding_errors="surrogateescape",
    )
    for index, row in enumerate(documents):
        text = _check_text(row["text"], f"{where}#{index}", "text", skips)
        if text is not None:
            yield text


def _iter_parquet(file: str, field: str, skips: SkipCounter) -> Iterator[str]:
    rows = datasets.load_dataset("parquet", data_files=[file], split="train", streaming=True)
    for row_no, row in enumerate(rows, start=1):
        if field not in row:
            raise DataError(f"{file}: no column '{field}' (columns: {', '.join(row)})")
        text = _check_text(row[field], f"{file}:{row_no}", field, skips)
        if text is not None:
            yield text


def _iter_hub(name: str, split: str, field: str, skips: SkipCounter) -> Iterator[str]:
    dataset_name, _, config_name = name.partition(":")
    try:
        rows = datasets.load_dataset(dataset_name, config_name or None, split=split, streaming=True)
    except Exception as exc:  # hub/network failures come in many types
        raise DataError(f"hf:{name}: cannot open dataset ({type(exc).__name__}: {exc})") from None
    for row_no, row in enumerate(rows, start=1):
        text = _check_text(row.get(field), f"hf:{name}#{row_no}", field, skips)
        if text is not None:
            yield text


def iter_documents(
    source: SourceConfig,
    split: str,
    skips: SkipCounter,
    epoch: int = 0,
    shuffle_seed: int = 0,
    validation_percent: float = 2.0,
) -> Iterator[str]:
    """Documents of `source` for `split` ("train" or "validation") in a deterministic order.

    Training order is shuffled at file level with (shuffle_seed, epoch), so each epoch has its
    own order and a resumed run can replay it exactly.
    """
    if source.path == BUILTIN_STDLIB:
        files = stdlib_files(split, validation_percent, skips if epoch == 0 else None)
        if split == "train":
            random.Random(f"{shuffle_seed}:{epoch}").shuffle(files)
        yield from _iter_text_files(files, BUILTIN_STDLIB, skips)
        return
    if source.path.startswith("builtin:"):
        raise DataError(f"{source.path}: unknown builtin corpus (known: {BUILTIN_STDLIB})")
    if source.path.startswith("hf:"):
        yield from _iter_hub(source.path[3:], split, source.text_field, skips)
        return
    files = resolve_local_files(source.path)
    if split == "train":
        random.Random(f"{shuffle_seed}:{epoch}").shuffle(files)
    for file in files:
        if not os.access(file, os.R_OK):
            skips.skip(file, "unreadable file")
            continue
        suffix = _base_suffix(file)
        if suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl(file, source.text_field, skips)
        elif suffix in PARQUET_SUFFIXES:
            yield from _iter_parquet(file, source.text_field, skips)
        else:
            yield from _iter_text_files([file], file, skips)
