"""Sharded streaming: across ranks and worker processes, every record is read once.

The global batch of B sequences is cut into V *logical shards* (`data.logical_shards`, by
default V = B): shard s gives B / V consecutive sequences of every global batch, and it reads
only the records with index i % V == s of each source (per epoch, after the file shuffle), mixes
the sources by token share and packs its own sequences. Its state (per source: epoch and
records consumed; the partial sequence; the mixture counters) is small and names no rank.

Rank r of W owns shards [r V/W, (r+1) V/W) and reads and tokenizes their records only; with
`data.num_workers: N`, worker process w of the rank runs every N-th of them. So the global batch,
and therefore the training run, is the same on any world size and any number of workers, the
checkpoint holds the state of all V shards (gathered from the ranks), and a resume on another
world size continues every shard where it stopped: each token is still seen exactly once.

Within a process, one pass over each source and epoch serves all its shards: records are parsed
once and queued for the shard that owns them, so V shards do not mean V reads of a file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.batch import Batch, causal_lm_batch
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.packing import GlobalBatchLoader, PackedSequences, build_packed_sequences
from data_pipeline.sources import DocumentFilter, ShardSet, SkipCounter, iter_indexed_outcomes
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.workers import (
    _RecordingSkips,
    put_while_parent_lives,
    start_in_worker,
    stop_workers,
)

STATE_FORMAT = "logical_shards"
QUEUE_ROUNDS = 4  # global batches a worker may run ahead of the training loop


@dataclass
class _Round:
    """One shard's part of a global batch: up to B/V sequences (fewer once it ended), and its
    state after them."""

    sequences: list[Any]  # tensors; NumPy arrays across the process boundary
    state: dict[str, Any]
    ended: bool


@dataclass
class _Record:
    """One record of a pass: its place, its text (None if bad), the skips met reading it."""

    where: str
    text: str | None
    skips: list[tuple[str, str]]


class _Pass:
    """One epoch of one source, read once for all the shards of a process.

    Records are parsed in order and queued for the shard that owns them; a shard that runs
    ahead makes the pass read further, the others find their records waiting. Skip events are
    kept with the record they came with and counted when a shard takes it, so records read
    ahead of a checkpoint are counted once, after it.
    """

    def __init__(
        self, source: SourceConfig, split: str, epoch: int, config: DataConfig, reader: ShardSet
    ) -> None:
        self._events = _RecordingSkips()
        self._outcomes: Iterator[tuple[int, str, str | None]] = iter_indexed_outcomes(
            source,
            split,
            self._events,
            epoch,
            config.shuffle_seed,
            config.builtin_validation_percent,
            reader,
        )
        self.num_shards = reader.count
        self.queues: dict[int, deque[_Record]] = {s: deque() for s in reader.shards}
        self.records_read = 0
        self.ended = False
        self.trailing: list[tuple[str, str]] = []  # events after the last record

    def next_record(self, shard: int) -> _Record | None:
        """The next record of `shard` in this epoch, or None at its end."""
        waiting = self.queues[shard]
        while not waiting and not self.ended:
            item = next(self._outcomes, None)
            events, self._events.events = self._events.events, []
            if item is None:
                self.ended = True
                self.trailing = events
                break
            index, where, text = item
            self.records_read += 1
            owner = self.queues.get(index % self.num_shards)
            if owner is not None:  # None: that shard already left this epoch
                owner.append(_Record(where, text, events))
        return waiting.popleft() if waiting else None

    def take_trailing(self) -> list[tuple[str, str]]:
        """The events after the last record, handed to the first shard to reach the end."""
        events, self.trailing = self.trailing, []
        return events

    def leave(self, shard: int) -> bool:
        """`shard` is done with this epoch; True when no shard needs the pass any more."""
        self.queues.pop(shard, None)
        return not self.queues


class _Passes:
    """The open passes of a process, by (source index, epoch)."""

    def __init__(
        self, sources: list[SourceConfig], split: str, config: DataConfig, reader: ShardSet
    ) -> None:
        self.sources = sources
        self.split = split
        self.config = config
        self.reader = reader
        self.open: dict[tuple[int, int], _Pass] = {}
        self.records_read = 0  # records parsed by passes already closed

    def get(self, source: int, epoch: int) -> _Pass:
        key = (source, epoch)
        if key not in self.open:
            self.open[key] = _Pass(
                self.sources[source], self.split, epoch, self.config, self.reader
            )
        return self.open[key]

    def leave(self, source: int, epoch: int, shard: int) -> None:
        key = (source, epoch)
        if key in self.open and self.open[key].leave(shard):
            self.records_read += self.open.pop(key).records_read

    def total_records_read(self) -> int:
        """Records this process has parsed (good or bad), for the tests' exactly-once proof."""
        return self.records_read + sum(p.records_read for p in self.open.values())


class ShardDocuments:
    """The documents of one source that belong to one logical shard, looping over epochs."""

    def __init__(
        self,
        source: SourceConfig,
        source_index: int,
        shard: int,
        passes: _Passes,
        tokenizer: Tokenizer,
        config: DataConfig,
        skips: SkipCounter,
        loop: bool,
    ) -> None:
        self.source = source
        self.source_index = source_index
        self.shard = shard
        self.passes = passes
        self.tokenizer = tokenizer
        self.config = config
        self.skips = skips
        self.loop = loop
        self.epoch = 0
        self.records_consumed = 0  # records (good or bad) of this shard taken in the epoch
        self.docs_consumed = 0  # documents among them that passed the filters
        self.filters = DocumentFilter.from_config(config)
        self._replayed = False

    def _replay(self) -> None:
        """Skip the records consumed before a checkpoint, rebuilding the dedup memory from
        them; their skips were counted before the checkpoint."""
        self.filters.reset()
        epoch_pass = self.passes.get(self.source_index, self.epoch)
        taken = 0
        while taken < self.records_consumed:
            record = epoch_pass.next_record(self.shard)
            if record is None:
                break
            taken += 1
            if record.text is not None and self.filters.active:
                self.filters.reason_to_drop(record.text)
        self.records_consumed = taken
        self._replayed = True

    def _next_record(self) -> _Record | None:
        for _ in range(2):
            if not self._replayed:
                self._replay()
            epoch_pass = self.passes.get(self.source_index, self.epoch)
            while (record := epoch_pass.next_record(self.shard)) is not None:
                self.records_consumed += 1
                for where, problem in record.skips:
                    self.skips.skip(where, problem)
                if record.text is None:
                    continue
                reason = self.filters.reason_to_drop(record.text)
                if reason is not None:
                    self.skips.drop(reason)
                    continue
                self.docs_consumed += 1
                return record
            for where, reason in epoch_pass.take_trailing():
                self.skips.skip(where, reason)
            self.passes.leave(self.source_index, self.epoch, self.shard)
            if not self.loop or self.docs_consumed == 0:
                # A whole epoch with nothing for this shard: the source sits out in its mixture.
                return None
            self.epoch += 1
            self.records_consumed = self.docs_consumed = 0
            self._replayed = False
        return None

    def next_document(self) -> list[int] | None:
        """The next document's tokens followed by EOS, or None when this shard has no more."""
        limit = self.config.max_doc_tokens
        while (record := self._next_record()) is not None:
            assert record.text is not None
            tokens = self.tokenizer.encode(record.text)
            if limit and len(tokens) > limit:
                self.skips.skip(record.where, f"document longer than {limit} tokens")
                continue
            return [*tokens, self.tokenizer.eos_id]
        return None

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, and records and documents of this shard consumed in it."""
        return {
            "epoch": self.epoch,
            "records_consumed": self.records_consumed,
            "docs_consumed": self.docs_consumed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go back to a saved position; the epoch is replayed up to it on the next read."""
        self.epoch = int(state["epoch"])
        self.records_consumed = int(state["records_consumed"])
        self.docs_consumed = int(state["docs_consumed"])
        self._replayed = False


class ShardGroup:
    """The logical shards one process runs: a packed, mixed stream per shard."""

    def __init__(
        self,
        shards: list[int],
        num_shards: int,
        sources: list[SourceConfig],
        tokenizer: Tokenizer,
        config: DataConfig,
        skips: SkipCounter,
        states: dict[int, dict[str, Any]] | None = None,
        loop: bool = True,
    ) -> None:
        self.passes = _Passes(sources, "train", config, ShardSet.from_shards(shards, num_shards))
        self.streams: dict[int, PackedSequences] = {}
        for shard in shards:
            documents = [
                ShardDocuments(source, index, shard, self.passes, tokenizer, config, skips, loop)
                for index, source in enumerate(sources)
            ]
            # Each shard meets the mixture on its own; it draws 1/V of the global tokens, so
            # the schedule's global `after_tokens` is compared with its own count x V.
            self.streams[shard] = PackedSequences(
                documents, config.seq_len, config.mixture_schedule, mixture_scale=num_shards
            )
            if states and shard in states:
                self.streams[shard].load_state_dict(states[shard])

    def next_sequence(self, shard: int) -> torch.Tensor | None:
        """The next (seq_len + 1,) sequence of `shard`, or None when it has no more."""
        return self.streams[shard].next_sequence()

    def state(self, shard: int) -> dict[str, Any]:
        """`shard`'s state: its sources' positions, mixture counters and partial sequence."""
        return self.streams[shard].state_dict()


def _round(
    group: ShardGroup, shards: list[int], sequences_per_shard: int, with_states: bool = True
) -> dict[int, _Round]:
    """The next part of a global batch from each of `shards`."""
    parts = {}
    for shard in shards:
        sequences = []
        for _ in range(sequences_per_shard):
            sequence = group.next_sequence(shard)
            if sequence is None:
                break
            sequences.append(sequence)
        ended = len(sequences) < sequences_per_shard
        parts[shard] = _Round(sequences, group.state(shard) if with_states else {}, ended)
    return parts


def _worker_main(
    shards: list[int],
    sequences_per_shard: int,
    num_shards: int,
    sources: list[SourceConfig],
    tokenizer_files: dict[str, bytes],
    config: DataConfig,
    strict: bool,
    states: dict[int, dict[str, Any]],
    loop: bool,
    out: mp.queues.Queue[Any],
    parent: int,
) -> None:
    """Produce this worker's shards' parts of each global batch, one message per batch.

    A shard that ends (only without `loop`) is reported once and left out from then on."""
    start_in_worker()
    try:
        skips = SkipCounter(strict)
        tokenizer = Tokenizer.from_files(tokenizer_files)
        group = ShardGroup(shards, num_shards, sources, tokenizer, config, skips, states, loop)
        reported: Counter[str] = Counter()
        live = list(shards)
        while live:
            parts = _round(group, live, sequences_per_shard)
            live = [shard for shard in live if not parts[shard].ended]
            for part in parts.values():
                part.sequences = [sequence.numpy() for sequence in part.sequences]
            new_skips = skips.counts - reported
            reported.update(new_skips)
            records = group.passes.total_records_read()
            put_while_parent_lives(out, ("round", parts, dict(new_skips), records), parent)
    except Exception as exc:  # reported in the main process, which raises it
        error = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        put_while_parent_lives(out, ("error", error), parent)


class _WorkerShards:
    """Worker processes running a rank's shards, each sending one message per global batch."""

    def __init__(
        self,
        shards: list[int],
        num_workers: int,
        sequences_per_shard: int,
        num_shards: int,
        sources: list[SourceConfig],
        tokenizer: Tokenizer,
        config: DataConfig,
        skips: SkipCounter,
        states: dict[int, dict[str, Any]],
        loop: bool,
    ) -> None:
        context = mp.get_context("fork")
        self.skips = skips
        self.queues: list[Any] = [context.Queue(QUEUE_ROUNDS) for _ in range(num_workers)]
        self.processes = []
        self.live: list[set[int]] = []  # each worker's shards that have not ended
        for worker in range(num_workers):
            mine = shards[worker::num_workers]
            self.live.append(set(mine))
            process = context.Process(
                target=_worker_main,
                args=(
                    mine,
                    sequences_per_shard,
                    num_shards,
                    sources,
                    tokenizer.files(),
                    config,
                    skips.strict,
                    {s: states[s] for s in mine if s in states},
                    loop,
                    self.queues[worker],
                    os.getpid(),
                ),
                daemon=True,
            )
            process.start()
            self.processes.append(process)
        self.records_read = [0] * num_workers  # as last reported by each worker

    def next_round(self) -> dict[int, _Round]:
        """Every live shard's part of the next global batch."""
        parts: dict[int, _Round] = {}
        for worker, live in enumerate(self.live):
            if live:
                parts.update(self._receive(worker))
                live.difference_update(s for s, part in parts.items() if part.ended)
        return parts

    def _receive(self, worker: int) -> dict[int, _Round]:
        while True:
            try:
                message = self.queues[worker].get(timeout=5.0)
                break
            except queue.Empty:
                if not self.processes[worker].is_alive():
                    raise DataError(f"data worker {worker} died unexpectedly") from None
        if message[0] == "error":
            self.close()
            raise DataError(message[1])
        _, parts, new_skips, self.records_read[worker] = message
        self.skips.counts.update(new_skips)
        return parts

    def close(self) -> None:
        stop_workers(self.processes, self.queues)


Gather = Callable[[Any], list[Any]]


class ShardedBatchLoader:
    """This rank's micro-batches of each global batch, read from its own logical shards only.

    Global batch g holds, for shard s = 0..V-1 in order, the next B/V sequences of shard s; rank
    r's contiguous B/W slice is exactly the sequences of its shards. `state_dict(gather)` holds
    all V shard states (`gather` collects the ranks' parts); any world size can load it.
    """

    counts_are_local = True  # skip and token counts cover this rank's shards only

    def __init__(
        self,
        sources: list[SourceConfig],
        tokenizer: Tokenizer,
        config: DataConfig,
        skips: SkipCounter,
        global_batch_seqs: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        loop: bool = True,
    ) -> None:
        if global_batch_seqs % (micro_batch_size * world_size):
            raise DataError(
                f"global batch of {global_batch_seqs} sequences is not divisible by "
                f"micro_batch_size {micro_batch_size} x world size {world_size}"
            )
        num_shards = config.logical_shards or global_batch_seqs
        if global_batch_seqs % num_shards:
            raise DataError(
                f"data.logical_shards: {num_shards} must divide the {global_batch_seqs} "
                "sequences of a global batch (0: one shard per sequence)"
            )
        if num_shards % world_size:
            raise DataError(
                f"data.logical_shards: {num_shards} shards do not split evenly over "
                f"{world_size} ranks"
            )
        self.sources = sources
        self.tokenizer = tokenizer
        self.config = config
        self.skips = skips
        self.global_batch_seqs = global_batch_seqs
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.loop = loop
        self.num_shards = num_shards
        self.sequences_per_shard = global_batch_seqs // num_shards
        per_rank = num_shards // world_size
        self.shards = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.num_workers = min(config.num_workers, per_rank)  # a worker runs >= 1 shard
        self.states: dict[int, dict[str, Any]] = {}  # shard states after the last batch
        self._group: ShardGroup | None = None
        self._workers: _WorkerShards | None = None

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_seqs // (self.micro_batch_size * self.world_size)

    def _start(self) -> None:
        if self.num_workers == 0:
            self._group = ShardGroup(
                self.shards,
                self.num_shards,
                self.sources,
                self.tokenizer,
                self.config,
                self.skips,
                self.states,
                self.loop,
            )
        else:
            self._workers = _WorkerShards(
                self.shards,
                self.num_workers,
                self.sequences_per_shard,
                self.num_shards,
                self.sources,
                self.tokenizer,
                self.config,
                self.skips,
                self.states,
                self.loop,
            )

    def _next_round(self, live: list[int]) -> dict[int, _Round]:
        """Each live shard's part of the next global batch (states only from workers)."""
        if self._group is None and self._workers is None:
            self._start()
        if self._workers is not None:
            parts = self._workers.next_round()
            for shard, part in parts.items():
                part.sequences = [torch.from_numpy(s) for s in part.sequences]
                self.states[shard] = part.state
            return parts
        assert self._group is not None
        return _round(self._group, live, self.sequences_per_shard, with_states=False)

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch, as typed batches (labels
        aligned, document ids from the EOS the packer put after each document)."""
        eos_id, masking = self.tokenizer.eos_id, self.config.document_masking
        return [
            causal_lm_batch(chunk, eos_id, masking)
            for chunk in self.next_rows().split(self.micro_batch_size)
        ]

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next global batch, each (inputs, labels) of (b, T)."""
        return [(b.input_ids, b.labels) for b in self.next_step()]

    def next_rows(self) -> torch.Tensor:
        """This rank's sequences of the next global batch, (B / world, T + 1)."""
        parts = self._next_round(self.shards)
        for shard in self.shards:
            if parts[shard].ended:
                raise DataError(
                    f"logical shard {shard} of {self.num_shards} has no usable documents "
                    "(fewer good records than data.logical_shards?)"
                )
        return torch.stack([sequence for s in self.shards for sequence in parts[s].sequences])

    def drain(self) -> dict[int, list[int]]:
        """Without `loop`: every remaining token of each of this rank's shards, in order.

        A shard's sequences overlap by one token, so their inputs and the last partial
        sequence left in its buffer tile its token stream exactly (the tests' coverage proof).
        """
        assert not self.loop, "drain() reads to the end of non-looping sources"
        streams: dict[int, list[int]] = {s: [] for s in self.shards}
        live = list(self.shards)
        while live:
            parts = self._next_round(live)
            for shard in live:
                for sequence in parts[shard].sequences:
                    streams[shard] += sequence[:-1].tolist()
                if parts[shard].ended:
                    streams[shard] += self._shard_state(shard)["buffer"]
            live = [shard for shard in live if not parts[shard].ended]
        return streams

    def _shard_state(self, shard: int) -> dict[str, Any]:
        return self._group.state(shard) if self._group is not None else self.states[shard]

    def local_state(self) -> dict[str, dict[str, Any]]:
        """The states of this rank's shards, keyed by shard number (as a string, for JSON)."""
        if self._group is not None:
            return {str(s): self._group.state(s) for s in self.shards}
        return {str(s): state for s, state in self.states.items()}

    def state_dict(self, gather: Gather | None = None) -> dict[str, Any]:
        """The global data state: every shard's state (`gather` collects all ranks' parts;
        every rank must call it then). The same on every rank and every world size."""
        parts = gather(self.local_state()) if gather is not None else [self.local_state()]
        shards: dict[str, Any] = {}
        for part in parts:
            shards.update(part)
        return {"format": STATE_FORMAT, "logical_shards": self.num_shards, "shards": shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue every shard of this rank where the saved run left it."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(
                "the checkpoint's data position is for another data pipeline (prepared shards "
                "or the older single-stream format); resume with the same data setup"
            )
        if int(state["logical_shards"]) != self.num_shards:
            raise DataError(
                f"data.logical_shards: the checkpoint has {state['logical_shards']} logical "
                f"shards, this run {self.num_shards}; set data.logical_shards to match"
            )
        self.close()
        self.states = {s: state["shards"][str(s)] for s in self.shards if str(s) in state["shards"]}

    def tokens_by_source(self) -> dict[str, int]:
        """Tokens drawn per source by this rank's shards (sum over ranks for the world)."""
        totals = dict.fromkeys((s.label for s in self.sources), 0)
        for state in self.local_state().values():
            for source, count in zip(self.sources, state["source_tokens"], strict=True):
                totals[source.label] += int(count)
        return totals

    def records_read(self) -> int:
        """Records this rank has parsed so far (with workers: those that have ended), for the
        tests' proof that a rank reads no other rank's records."""
        if self._workers is not None:
            return sum(self._workers.records_read)
        return self._group.passes.total_records_read() if self._group is not None else 0

    def close(self) -> None:
        """Stop worker processes and drop open passes (they restart from the states)."""
        if self._group is not None:
            self.states = {s: self._group.state(s) for s in self.shards}
            self._group = None
        if self._workers is not None:
            self._workers.close()
            self._workers = None


def sum_counts(parts: list[dict[str, int]]) -> dict[str, int]:
    """Per-key sums of the ranks' counters (skips by reason, tokens by source)."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(total)


def gather_from_ranks(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (a collective: every rank must call it)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def build_train_loader(
    tokenizer: Tokenizer,
    config: DataConfig,
    skips: SkipCounter,
    global_batch_seqs: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
) -> ShardedBatchLoader | GlobalBatchLoader:
    """The training loader: over prepared shards, the global stream that each rank cuts its
    slice from (it reads only its own tokens); streaming, this rank's logical shards."""
    if config.prepared:
        sequences = build_packed_sequences(
            config.train, "train", tokenizer, config, skips, loop=True
        )
        return GlobalBatchLoader(
            sequences,
            global_batch_seqs,
            micro_batch_size,
            rank,
            world_size,
            eos_id=tokenizer.eos_id,
            document_masking=config.document_masking,
        )
    return ShardedBatchLoader(
        config.train,
        tokenizer,
        config,
        skips,
        global_batch_seqs,
        micro_batch_size,
        rank,
        world_size,
    )
