"""Read and tokenize a source in worker processes, merged back into the single-process order.

Worker w of N is `Reader(w, N)`: it parses only the records with index i % N == w and tokenizes
the good ones. Each worker reports one outcome per record it owns, so the main process takes
record i from worker i % N and gets exactly the order, the skip counts and the strict-mode
errors of the single-process path. The mixture, filters and packing stay in the main process,
where the order is global.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import Reader, SkipCounter, iter_outcomes
from data_pipeline.tokenizer import Tokenizer

BATCH_RECORDS = 32
QUEUE_BATCHES = 8


@dataclass
class Outcome:
    """One record: its place, its text (None if bad), its tokens (None if not tokenized)."""

    where: str
    text: str | None
    tokens: np.ndarray[Any, Any] | None
    skips: list[tuple[str, str]]  # skip events reported with (before) this record
    is_record: bool = True  # False for the final carrier of trailing skip events


class _RecordingSkips(SkipCounter):
    """Worker side: never raises; the main process replays the events in global order."""

    def __init__(self) -> None:
        super().__init__(strict=False)
        self.events: list[tuple[str, str]] = []

    def skip(self, where: str, reason: str) -> None:
        self.events.append((where, reason))


@dataclass(frozen=True)
class WorkerJob:
    """What a worker reads: one epoch of one source, tokenizing records from `tokenize_from`."""

    source: SourceConfig
    split: str
    epoch: int
    shuffle_seed: int
    validation_percent: float
    tokenize_from: int  # records before this index are replayed (texts only) on resume
    send_texts: bool = True  # False when no filter needs them: good records carry "" instead


def start_in_worker() -> None:
    """Forked from a rank that may handle SIGTERM as "save and stop": a worker must just stop
    (else `terminate()` would not end it)."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(number, signal.SIG_DFL)


def put_while_parent_lives(out: mp.queues.Queue[Any], message: Any, parent: int) -> None:
    """Send `message`, waiting while the queue is full; exit if the parent process is gone (a
    rank killed hard must not leave its workers blocked forever, holding its pipes)."""
    while True:
        try:
            out.put(message, timeout=1.0)
            return
        except queue.Full:
            if os.getppid() != parent:
                os._exit(0)


def _worker_main(
    job: WorkerJob,
    reader: Reader,
    tokenizer_files: dict[str, bytes],
    out: mp.queues.Queue[Any],
    parent: int,
) -> None:
    start_in_worker()
    try:
        tokenizer = Tokenizer.from_files(tokenizer_files)
        skips = _RecordingSkips()
        batch: list[Outcome] = []
        pending_texts: list[int] = []
        record = reader.index
        outcomes = iter_outcomes(
            job.source,
            job.split,
            skips,
            job.epoch,
            job.shuffle_seed,
            job.validation_percent,
            reader,
        )
        for where, text in outcomes:
            events, skips.events = skips.events, []
            batch.append(Outcome(where, text, None, events))
            if text is not None and record >= job.tokenize_from:
                pending_texts.append(len(batch) - 1)
            record += reader.count
            if len(batch) >= BATCH_RECORDS:
                _send(batch, pending_texts, tokenizer, out, parent, job.send_texts)
                batch, pending_texts = [], []
        _send(batch, pending_texts, tokenizer, out, parent, job.send_texts)
        put_while_parent_lives(out, ("end", skips.events), parent)
    except Exception as exc:  # reported in the main process, which raises it
        message = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        put_while_parent_lives(out, ("error", message), parent)


def _send(
    batch: list[Outcome],
    pending: list[int],
    tokenizer: Tokenizer,
    out: mp.queues.Queue[Any],
    parent: int,
    send_texts: bool = True,
) -> None:
    if not batch:
        return
    texts = [batch[i].text or "" for i in pending]
    for index, ids in zip(pending, tokenizer.encode_batch(texts), strict=True):
        batch[index].tokens = np.asarray(ids, dtype=np.int32)
    if not send_texts:  # halves what crosses the process boundary
        for index in pending:
            batch[index].text = ""
    put_while_parent_lives(out, ("batch", batch), parent)


class WorkerPool:
    """N worker processes over one epoch of a source; iterate to get outcomes in global order."""

    def __init__(self, job: WorkerJob, tokenizer: Tokenizer, num_workers: int) -> None:
        context = mp.get_context("fork")
        self.queues: list[Any] = [context.Queue(QUEUE_BATCHES) for _ in range(num_workers)]
        self.processes = [
            context.Process(
                target=_worker_main,
                args=(
                    job,
                    Reader(w, num_workers),
                    tokenizer.files(),
                    self.queues[w],
                    os.getpid(),
                ),
                daemon=True,
            )
            for w in range(num_workers)
        ]
        for process in self.processes:
            process.start()
        self.buffers: list[deque[Outcome]] = [deque() for _ in range(num_workers)]
        self.ended = [False] * num_workers
        self.trailing: list[list[tuple[str, str]]] = [[] for _ in range(num_workers)]

    def _fill(self, worker: int) -> None:
        while not self.buffers[worker] and not self.ended[worker]:
            try:
                kind, payload = self.queues[worker].get(timeout=5.0)
            except queue.Empty:
                if not self.processes[worker].is_alive():
                    raise DataError(f"data worker {worker} died unexpectedly") from None
                continue
            if kind == "batch":
                self.buffers[worker].extend(payload)
            elif kind == "end":
                self.ended[worker] = True
                self.trailing[worker] = payload
            else:
                self.close()
                raise DataError(payload)

    def __iter__(self) -> Iterator[Outcome]:
        record = 0
        count = len(self.processes)
        try:
            while True:
                worker = record % count
                self._fill(worker)
                if not self.buffers[worker]:
                    break  # record `record` does not exist: the epoch is over
                yield self.buffers[worker].popleft()
                record += 1
            for worker in range(count):  # events after the last records (e.g. a failed read)
                self._fill(worker)
                while not self.ended[worker]:
                    self.buffers[worker].clear()
                    self._fill(worker)
            trailing = [event for events in self.trailing for event in events]
            yield Outcome("", None, None, trailing, is_record=False)
        finally:
            self.close()

    def close(self) -> None:
        stop_workers(self.processes, self.queues)


def stop_workers(processes: list[Any], queues: list[Any]) -> None:
    """Terminate worker processes, reap them, and drop their queues without waiting to flush."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5.0)
    for q in queues:
        q.close()
        q.cancel_join_thread()
