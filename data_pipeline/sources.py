"""Document sources read through Hugging Face `datasets` in streaming mode.

A source yields plain-text documents. Bad records are counted by reason and skipped, or, with
`strict`, stop the run with `file:line: reason`. Nothing malformed reaches the tokenizer.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import random
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import fsspec

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_STDLIB = "builtin:stdlib"
BUILTIN_STDLIB_INSTRUCT = "builtin:stdlib-instruct"
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

    def drop(self, reason: str) -> None:
        """Count a record removed by a quality filter: a choice, not an error, so never raises."""
        self.counts[reason] += 1

    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Reader:
    """One reader of a source: records with global index i are read by reader i % count.

    Any set of readers {0..count-1} parses every record of an epoch exactly once, whatever the
    number or sizes of the files (`Reader.of` numbers ranks x workers this way). The worker
    processes of one stream use it (`data.num_workers` in `data prepare` and validation);
    streaming training reads by logical shard instead (`ShardSet`, `data_pipeline.sharded`).
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"reader {self.index} out of range for {self.count} readers")

    @classmethod
    def of(cls, rank: int, world_size: int, worker: int = 0, num_workers: int = 0) -> Reader:
        """The reader of DataLoader `worker` (of `num_workers`, 0 = in process) on `rank`."""
        return cls(rank, world_size).split(worker, max(num_workers, 1))

    def owns(self, record_index: int) -> bool:
        """Whether record `record_index` of an epoch is this reader's to parse."""
        return record_index % self.count == self.index

    @property
    def counts_shared(self) -> bool:
        """Whether problems every reader of a file meets (an unreadable file) are counted here:
        by exactly one reader of the world, so the summed counts are exact."""
        return self.index == 0

    def split(self, part: int, parts: int) -> Reader:
        """Part `part` of `parts` of this reader's records: its k-th record goes to part k % parts."""
        return Reader(self.index + part * self.count, self.count * parts)


@dataclass(frozen=True)
class ShardSet(Reader):
    """The records of a set of logical shards: record i belongs to shard i % count.

    One pass over a source with a `ShardSet` parses the records of all its shards and no
    others (`data_pipeline.sharded` hands them to each shard in order).
    """

    shards: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not self.shards or not all(0 <= s < self.count for s in self.shards):
            raise ValueError(f"shards {sorted(self.shards)} out of range for {self.count} shards")

    @classmethod
    def from_shards(cls, shards: Iterable[int], count: int) -> ShardSet:
        """The reader of `shards` among `count` logical shards."""
        owned = frozenset(shards)
        return cls(min(owned, default=0), count, owned)

    def owns(self, record_index: int) -> bool:
        return record_index % self.count in self.shards

    @property
    def counts_shared(self) -> bool:
        return 0 in self.shards

    def split(self, part: int, parts: int) -> Reader:
        raise NotImplementedError("a shard set is split by handing out its shards")


class DocumentFilter:
    """Quality filters: minimum length, maximum non-text fraction, exact dedup by hash.

    Dropped documents are counted by reason (`filtered: ...`); the dedup memory is per
    source and epoch, so a resumed run that replays an epoch rebuilds it exactly.
    """

    def __init__(
        self, min_chars: int = 0, max_nontext_fraction: float = 1.0, dedup: bool = False
    ) -> None:
        self.min_chars = min_chars
        self.max_nontext_fraction = max_nontext_fraction
        self.dedup = dedup
        self._seen: set[bytes] = set()

    @classmethod
    def from_config(cls, config: DataConfig) -> DocumentFilter:
        """The filters that `data.*` asks for."""
        return cls(config.min_doc_chars, config.max_nontext_fraction, config.dedup)

    @property
    def active(self) -> bool:
        """Whether any filter can drop a document (else texts need not be looked at)."""
        return self.min_chars > 0 or self.max_nontext_fraction < 1.0 or self.dedup

    def reset(self) -> None:
        """Forget the documents seen (at the start of each epoch)."""
        self._seen.clear()

    def reason_to_drop(self, text: str) -> str | None:
        """Why `text` is filtered out, or None to keep it (and remember it for dedup)."""
        if len(text) < self.min_chars:
            return f"filtered: shorter than {self.min_chars} chars"
        if self.max_nontext_fraction < 1.0:
            nontext = sum(1 for ch in text if not (ch.isprintable() or ch in "\t\n\r"))
            nontext += text.count("\ufffd")
            if nontext > self.max_nontext_fraction * len(text):
                return f"filtered: over {self.max_nontext_fraction:g} non-text chars"
        if self.dedup:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest in self._seen:
                return "filtered: exact duplicate"
            self._seen.add(digest)
        return None


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


def _extract(record: dict[str, Any], where: str, field: str | None, skips: SkipCounter) -> Any:
    """The checked text of `record[field]`, or, with `field` None (record-level reading for
    post-training formats), the record itself."""
    if field is None:
        return record
    return _check_text(record.get(field), where, field, skips)


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


class _Cursor:
    """The running record index of one source's epoch, and which records this reader owns."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.next_index = 0

    def take(self) -> bool:
        """Advance past one record; True when this reader owns it."""
        index = self.next_index
        self.next_index += 1
        return self.reader.owns(index)


def _skip_shared(where: str, reason: str, skips: SkipCounter, reader: Reader | None) -> None:
    """A problem every reader of a file meets: reader 0 alone counts it, so the world total is
    exact, but in strict mode every reader stops. `reader=None`: only this reader meets it."""
    if skips.strict or reader is None or reader.counts_shared:
        skips.skip(where, reason)


def _read_failed(where: str, exc: BaseException, skips: SkipCounter, reader: Reader | None) -> None:
    logger.warning("%s: unreadable file (%s: %s)", where, type(exc).__name__, exc)
    _skip_shared(where, "unreadable file", skips, reader)


def _rows(rows: Iterable[Any], file: str, skips: SkipCounter, reader: Reader) -> Iterator[Any]:
    """`rows` until the end or the first read/decompression failure, which is counted."""
    iterator = iter(rows)
    count = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # gzip/zstd/arrow/OS errors come in many types
            _read_failed(f"{file}:{count + 1}", exc, skips, reader)
            return
        count += 1
        yield row


class _ZstdReader:
    """Streaming zstd decompression that, unlike fsspec's, reports a truncated stream."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.decompressor = self._new_frame()
        self.pending = b""

    @staticmethod
    def _new_frame() -> Any:
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        while len(self.pending) < size:
            if self.decompressor.eof and self.decompressor.unused_data:  # a following frame
                leftover = self.decompressor.unused_data
                self.decompressor = self._new_frame()
                self.pending += self.decompressor.decompress(leftover)
                continue
            chunk = self.raw.read(size)
            if not chunk:
                if not self.decompressor.eof:
                    raise EOFError("zstd stream ends before its end-of-frame marker")
                break
            if self.decompressor.eof:
                self.decompressor = self._new_frame()
            self.pending += self.decompressor.decompress(chunk)
        data, self.pending = self.pending[:size], self.pending[size:]
        return data


@contextlib.contextmanager
def _open_binary(file: str) -> Iterator[Any]:
    # fsspec is the file layer `datasets` streams through: local or remote paths, and
    # .gz inferred from the name. Lines are decoded here, one by one, because the `text`
    # builder turns one invalid byte into a failure of its whole batch of lines.
    if file.lower().endswith((".zst", ".zstd")):
        with fsspec.open(file, "rb") as raw:
            yield _ZstdReader(raw)
    else:
        with fsspec.open(file, "rb", compression="infer") as handle:
            yield handle


def _split_lines(handle: Any, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    # Some decompressors (zstd) are readable but not line-iterable.
    rest = b""
    while chunk := handle.read(chunk_bytes):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _lines(file: str, skips: SkipCounter, reader: Reader) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, raw line, is last line) of `file`; a read failure is counted and ends it."""
    with _open_binary(file) as handle:
        numbered = enumerate(_rows(_split_lines(handle), file, skips, reader), start=1)
        pending = next(numbered, None)
        while pending is not None:
            following = next(numbered, None)  # one line of look-ahead tells the last line apart
            yield pending[0], pending[1], following is None
            pending = following


def _decode(
    raw: bytes, where: str, skips: SkipCounter, shared_by: Reader | None = None
) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        _skip_shared(where, "invalid UTF-8", skips, shared_by)
        return None


def _iter_json_array(
    file: str, field: str | None, skips: SkipCounter, cursor: _Cursor
) -> Iterator[tuple[str, Any]]:
    try:
        with _open_binary(file) as handle:
            raw = handle.read()
    except Exception as exc:  # gzip/zstd/OS errors come in many types
        _read_failed(file, exc, skips, cursor.reader)
        return
    content = _decode(raw, file, skips, shared_by=cursor.reader)
    if content is None:
        return
    try:
        records = json.loads(content)
    except json.JSONDecodeError as exc:
        _skip_shared(f"{file}:{exc.lineno}", "malformed JSON", skips, cursor.reader)
        return
    if not isinstance(records, list):
        _skip_shared(file, "JSON file is not an array of objects", skips, cursor.reader)
        return
    for index, record in enumerate(records):
        if not cursor.take():
            continue
        where = f"{file}#{index}"
        if not isinstance(record, dict):
            skips.skip(where, "record is not a JSON object")
            yield where, None
            continue
        yield where, _extract(record, where, field, skips)


def _starts_with_bracket(file: str) -> bool:
    try:
        with _open_binary(file) as handle:
            return handle.read(4096).lstrip()[:1] == b"["
    except Exception:  # reported when the file is read for real
        return False


def _iter_jsonl(
    file: str, field: str | None, skips: SkipCounter, cursor: _Cursor
) -> Iterator[tuple[str, Any]]:
    if _base_suffix(file) == ".json" and _starts_with_bracket(file):
        yield from _iter_json_array(file, field, skips, cursor)
        return
    for line_no, raw, is_last in _lines(file, skips, cursor.reader):
        if not raw.strip() or not cursor.take():
            continue
        where = f"{file}:{line_no}"
        line = _decode(raw, where, skips)
        if line is None:
            yield where, None
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            truncated = is_last and not raw.endswith(b"\n")
            skips.skip(where, "truncated last line" if truncated else "malformed JSON")
            yield where, None
            continue
        if not isinstance(record, dict):
            skips.skip(where, "record is not a JSON object")
            yield where, None
            continue
        yield where, _extract(record, where, field, skips)


def _iter_text_files(
    files: list[str], skips: SkipCounter, cursor: _Cursor
) -> Iterator[tuple[str, str | None]]:
    """Each file is one document."""
    for file in files:
        if not cursor.take():
            continue
        try:
            with _open_binary(file) as handle:
                raw = handle.read()
        except Exception as exc:  # gzip/zstd/OS errors come in many types
            _read_failed(file, exc, skips, None)  # only the owner of the file reads it
            yield file, None
            continue
        text = _decode(raw, file, skips)
        yield file, None if text is None else _check_text(text, file, "text", skips)


def _iter_parquet(
    file: str, field: str | None, skips: SkipCounter, cursor: _Cursor
) -> Iterator[tuple[str, Any]]:
    rows = datasets.load_dataset("parquet", data_files=[file], split="train", streaming=True)
    for row_no, row in enumerate(_rows(rows, file, skips, cursor.reader), start=1):
        if field is not None and field not in row:
            raise DataError(f"{file}: no column '{field}' (columns: {', '.join(row)})")
        if not cursor.take():
            continue
        where = f"{file}:{row_no}"
        yield where, _extract(dict(row), where, field, skips)


def _iter_hub(
    name: str, split: str, field: str | None, skips: SkipCounter, cursor: _Cursor
) -> Iterator[tuple[str, Any]]:
    dataset_name, _, config_name = name.partition(":")
    try:
        rows = datasets.load_dataset(dataset_name, config_name or None, split=split, streaming=True)
    except Exception as exc:  # hub/network failures come in many types
        raise DataError(f"hf:{name}: cannot open dataset ({type(exc).__name__}: {exc})") from None
    for row_no, row in enumerate(_rows(rows, f"hf:{name}", skips, cursor.reader), start=1):
        if not cursor.take():
            continue
        where = f"hf:{name}#{row_no}"
        yield where, _extract(dict(row), where, field, skips)


def source_files(source: SourceConfig, split: str, validation_percent: float = 2.0) -> list[str]:
    """The local files behind `source` in their unshuffled order ([] for hub datasets)."""
    if source.path in (BUILTIN_STDLIB, BUILTIN_STDLIB_INSTRUCT):
        return stdlib_files(split, validation_percent)
    if source.path.startswith(("builtin:", "hf:")):
        return []
    return resolve_local_files(source.path)


def iter_outcomes(
    source: SourceConfig,
    split: str,
    skips: SkipCounter,
    epoch: int = 0,
    shuffle_seed: int = 0,
    validation_percent: float = 2.0,
    reader: Reader | None = None,
) -> Iterator[tuple[str, str | None]]:
    """(where, text) for every record of `source` this reader owns, in a fixed order.

    `text` is None for a bad record (already counted in `skips`, or raised in strict mode):
    one outcome per record is what lets readers' outputs be merged back into the global order.
    `where` is `file:line` (or the file, for whole-file documents). Training order is shuffled
    at file level with (shuffle_seed, epoch), so each epoch has its own order and a resumed run
    can replay it exactly. With `reader`, only the records it owns are parsed and yielded.
    """
    yield from _outcomes_at(
        source, split, skips, epoch, shuffle_seed, validation_percent, _Cursor(reader or Reader())
    )


def iter_indexed_outcomes(
    source: SourceConfig,
    split: str,
    skips: SkipCounter,
    epoch: int,
    shuffle_seed: int,
    validation_percent: float,
    reader: Reader,
) -> Iterator[tuple[int, str, str | None]]:
    """`iter_outcomes` with each record's index in the epoch: (index, where, text)."""
    cursor = _Cursor(reader)
    for where, text in _outcomes_at(
        source, split, skips, epoch, shuffle_seed, validation_percent, cursor
    ):
        yield cursor.next_index - 1, where, text  # the record just taken


def _outcomes_at(
    source: SourceConfig,
    split: str,
    skips: SkipCounter,
    epoch: int,
    shuffle_seed: int,
    validation_percent: float,
    cursor: _Cursor,
    records: bool = False,
) -> Iterator[tuple[str, Any]]:
    """Texts (`source.text_field`), or with `records` the whole JSON records, of the source."""
    field = None if records else source.text_field
    if source.path == BUILTIN_STDLIB_INSTRUCT:
        if not records:
            raise DataError(f"{source.path}: an instruction set, for post-training stages only")
        for where, record in stdlib_instructions(split, validation_percent):
            if cursor.take():
                yield where, record
        return
    if source.path == BUILTIN_STDLIB:
        counted = epoch == 0 and cursor.reader.counts_shared  # files, not records: count once
        files = stdlib_files(split, validation_percent, skips if counted else None)
        if split == "train":
            random.Random(f"{shuffle_seed}:{epoch}").shuffle(files)
        yield from _as_records(_iter_text_files(files, skips, cursor), records)
        return
    if source.path.startswith("builtin:"):
        raise DataError(
            f"{source.path}: unknown builtin corpus "
            f"(known: {BUILTIN_STDLIB}, {BUILTIN_STDLIB_INSTRUCT})"
        )
    if source.path.startswith("hf:"):
        yield from _iter_hub(source.path[3:], split, field, skips, cursor)
        return
    files = resolve_local_files(source.path)
    if split == "train":
        random.Random(f"{shuffle_seed}:{epoch}").shuffle(files)
    for file in files:
        if not os.access(file, os.R_OK):
            if skips.strict or cursor.reader.counts_shared:
                skips.skip(file, "unreadable file")
            continue
        suffix = _base_suffix(file)
        if suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl(file, field, skips, cursor)
        elif suffix in PARQUET_SUFFIXES:
            yield from _iter_parquet(file, field, skips, cursor)
        else:
            yield from _as_records(_iter_text_files([file], skips, cursor), records)


def _as_records(
    outcomes: Iterator[tuple[str, str | None]], records: bool
) -> Iterator[tuple[str, Any]]:
    """Whole-file documents, as `{"text": ...}` records when reading records."""
    for where, text in outcomes:
        yield where, ({"text": text} if records and text is not None else text)


def iter_record_outcomes(
    source: SourceConfig,
    split: str,
    skips: SkipCounter,
    epoch: int = 0,
    shuffle_seed: int = 0,
    validation_percent: float = 2.0,
    reader: Reader | None = None,
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(where, record) for every record of `source` this reader owns: the JSON objects (rows)
    as they are, for the post-training formats that read several fields; plain-text files as
    `{"text": ...}`. None marks a bad record (counted in `skips`, or raised when strict)."""
    yield from _outcomes_at(
        source,
        split,
        skips,
        epoch,
        shuffle_seed,
        validation_percent,
        _Cursor(reader or Reader()),
        records=True,
    )


def iter_records(
    source: SourceConfig,
    split: str,
    skips: SkipCounter,
    epoch: int = 0,
    shuffle_seed: int = 0,
    validation_percent: float = 2.0,
    reader: Reader | None = None,
) -> Iterator[tuple[str, str]]:
    """(where, text) of the good documents among `iter_outcomes`."""
    for where, text in iter_outcomes(
        source, split, skips, epoch, shuffle_seed, validation_percent, reader
    ):
        if text is not None:
            yield where, text


def iter_documents(
    source: SourceConfig,
    split: str,
    skips: SkipCounter,
    epoch: int = 0,
    shuffle_seed: int = 0,
    validation_percent: float = 2.0,
    reader: Reader | None = None,
    filters: DocumentFilter | None = None,
) -> Iterator[str]:
    """The texts of `iter_records`, after the quality `filters` (counted in `skips`)."""
    for _, text in iter_records(
        source, split, skips, epoch, shuffle_seed, validation_percent, reader
    ):
        if filters is not None and (reason := filters.reason_to_drop(text)) is not None:
            skips.drop(reason)
            continue
        yield text


_TEST_FOLDERS = {"test", "tests", "idle_test"}


def _first_paragraph(docstring: str) -> str:
    return docstring.strip().split("\n\n")[0].strip()


def stdlib_instructions(
    split: str, validation_percent: float = 2.0, max_per_file: int = 8
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`builtin:stdlib-instruct`: (where, messages record) pairs built from the standard library.

    The user gives a public function's signature, the assistant answers with the first
    paragraph of its docstring. Files are split as `builtin:stdlib` splits them (by file hash),
    so the held-out split shares no file with training; at most `max_per_file` functions per
    file, in source order, so the set stays small and every run builds the same one.
    """
    import ast

    for file in stdlib_files(split, validation_percent):
        if _TEST_FOLDERS & set(Path(file).parts):
            continue  # test suites: large files with few documented public functions
        try:
            tree = ast.parse(Path(file).read_text(encoding="utf-8"))
        except (SyntaxError, ValueError, OSError):
            continue  # a test fixture with deliberately invalid syntax: not an example source
        taken = 0
        for node in ast.walk(tree):
            if taken >= max_per_file:
                break
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            docstring = ast.get_docstring(node)
            if node.name.startswith("_") or not docstring:
                continue
            answer = _first_paragraph(docstring)
            if len(answer) < 20:
                continue
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            signature = f"{prefix} {node.name}({ast.unparse(node.args)}):"
            question = f"Write the docstring of this function:\n{signature}"
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            taken += 1
            yield f"{file}:{node.lineno}", {"messages": messages}
