"""Token streams: a weighted mixture of sources, tokenized and packed into fixed-length sequences.

Every piece here has a `state_dict()` that pins the exact next token, and the state does not
depend on the number of ranks: ranks take their slice of each *global* batch (see
`GlobalBatchLoader`), so a checkpoint resumes exactly on any world size. Training reads
prepared shards this way; streamed sources are read by logical shard (`data_pipeline.sharded`),
each shard a `PackedSequences` of its own records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from data_pipeline.config import DataConfig, MixturePhase, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import DocumentFilter, SkipCounter, iter_outcomes
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.workers import Outcome, WorkerJob, WorkerPool

if TYPE_CHECKING:
    from data_pipeline.batch import Batch


class DocumentStream(Protocol):
    """What `PackedSequences` mixes: tokenized documents of one source, resumable."""

    source: SourceConfig

    def next_document(self) -> list[int] | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class RandomAccessStream(DocumentStream, Protocol):
    """A stream whose documents can be measured without being read (prepared shards)."""

    def next_document_span(self) -> tuple[int, int] | None:
        """(document index, length in tokens incl. EOS) of the next document, or None."""
        ...

    def read_tokens(self, document: int, start: int, end: int) -> list[int]:
        """Tokens [start, end) of document `document`."""
        ...


class _SwitchableSkips(SkipCounter):
    """Forwards to `target`; a resume replays the consumed part of an epoch into a scratch
    counter so that records skipped before the checkpoint are not counted twice."""

    def __init__(self, target: SkipCounter) -> None:
        super().__init__(target.strict)
        self.target = target

    def skip(self, where: str, reason: str) -> None:
        self.target.skip(where, reason)

    def drop(self, reason: str) -> None:
        self.target.drop(reason)


class SourceStream:
    """Tokenized documents of one source, looping over epochs, resumable by record count."""

    def __init__(
        self,
        source: SourceConfig,
        split: str,
        tokenizer: Tokenizer,
        data_config: DataConfig,
        skips: SkipCounter,
        loop: bool,
    ) -> None:
        self.source = source
        self.split = split
        self.tokenizer = tokenizer
        self.data_config = data_config
        self.skips = skips
        self.loop = loop
        self.epoch = 0
        self.docs_consumed = 0  # documents taken from the current epoch (after filters)
        self.records_consumed = 0  # records (good or bad) taken from the current epoch
        self.filters = DocumentFilter.from_config(data_config)
        self._skips = _SwitchableSkips(skips)
        self._documents: Iterator[Outcome] | None = None

    def _outcomes(self) -> Iterator[Outcome]:
        """Every record of the epoch in order: read here, or by `data.num_workers` workers."""
        if self.data_config.num_workers == 0:
            for where, text in iter_outcomes(
                self.source,
                self.split,
                self._skips,
                epoch=self.epoch,
                shuffle_seed=self.data_config.shuffle_seed,
                validation_percent=self.data_config.builtin_validation_percent,
            ):
                yield Outcome(where, text, None, [])
            return
        job = WorkerJob(
            self.source,
            self.split,
            self.epoch,
            self.data_config.shuffle_seed,
            self.data_config.builtin_validation_percent,
            tokenize_from=self.records_consumed,
            send_texts=self.filters.active,
        )
        for outcome in WorkerPool(job, self.tokenizer, self.data_config.num_workers):
            for where, reason in outcome.skips:  # in global order; raises here when strict
                self._skips.skip(where, reason)
            yield outcome

    def _open(self) -> Iterator[Outcome]:
        self.filters.reset()
        outcomes = self._outcomes()
        # Replay the consumed part of the epoch (read, not tokenized) to rebuild the dedup
        # memory; what it skips was counted before the checkpoint.
        self._skips.target = SkipCounter(strict=False)
        records = docs = 0
        while records < self.records_consumed or (
            self.records_consumed == 0 and docs < self.docs_consumed  # a pre-records state
        ):
            outcome = next(outcomes, None)
            if outcome is None:
                break
            if not outcome.is_record:
                continue
            records += 1
            if outcome.text is not None and self.filters.reason_to_drop(outcome.text) is None:
                docs += 1
        self.records_consumed = records
        self._skips.target = self.skips
        return outcomes

    def _next_outcome(self) -> Outcome | None:
        for _ in range(2):
            if self._documents is None:
                self._documents = self._open()
            for outcome in self._documents:
                if not outcome.is_record:
                    continue
                self.records_consumed += 1
                if outcome.text is None:
                    continue
                reason = self.filters.reason_to_drop(outcome.text)
                if reason is not None:
                    self._skips.drop(reason)
                    continue
                self.docs_consumed += 1
                return outcome
            if not self.loop:
                return None
            if self.docs_consumed == 0:
                raise DataError(f"{self.source.path}: source yields no usable documents")
            self.epoch += 1
            self.docs_consumed = self.records_consumed = 0
            self._documents = None
        raise DataError(f"{self.source.path}: source yields no usable documents")

    def next_document(self) -> list[int] | None:
        """The next document's tokens followed by EOS, or None when a non-looping source ends."""
        limit = self.data_config.max_doc_tokens
        while (outcome := self._next_outcome()) is not None:
            assert outcome.text is not None
            tokens = (
                outcome.tokens.tolist()
                if outcome.tokens is not None
                else self.tokenizer.encode(outcome.text)
            )
            if limit and len(tokens) > limit:
                self.skips.skip(outcome.where, f"document longer than {limit} tokens")
                continue
            return [*tokens, self.tokenizer.eos_id]
        return None

    def close(self) -> None:
        """Stop any worker processes (they restart from the state when needed)."""
        if self._documents is not None:
            self._documents.close()  # type: ignore[attr-defined]
            self._documents = None

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, documents and records consumed in it."""
        return {
            "epoch": self.epoch,
            "docs_consumed": self.docs_consumed,
            "records_consumed": self.records_consumed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go back to a saved position; the epoch is replayed up to it on the next read."""
        self.close()
        self.epoch = int(state["epoch"])
        self.docs_consumed = int(state["docs_consumed"])
        self.records_consumed = int(state.get("records_consumed", 0))


class PackedSequences:
    """Fixed-length sequences of seq_len + 1 tokens cut from a weighted mixture of sources.

    Consecutive sequences overlap by one token, so the inputs (seq[:-1]) tile the token stream
    and every token is predicted exactly once. The mixture is deterministic: the next document
    comes from the source furthest below its token share (weight / sum of weights).
    """

    def __init__(
        self,
        streams: Sequence[DocumentStream],
        seq_len: int,
        schedule: Sequence[MixturePhase] = (),
        mixture_scale: int = 1,
    ) -> None:
        if not streams:
            raise DataError("no data sources")
        self.streams = list(streams)
        self.seq_len = seq_len
        self.schedule = list(schedule)
        # This stream's share of the global token count (a logical shard draws 1/V of it):
        # the schedule's `after_tokens` are global.
        self.mixture_scale = mixture_scale
        self.shares = self._shares(-1)
        self.source_tokens = [0] * len(streams)
        # The mixture phase in force and the per-source token counts when it began: shares
        # are met within each phase, so a new phase is not skewed by the counts before it.
        self.phase = -1
        self.phase_start_tokens = [0] * len(streams)
        self.buffer: list[int] = []
        # With random-access streams the buffer is kept as spans [source, document, start, end]:
        # the mixture and the cuts need only document lengths, so a rank can skip the other
        # ranks' sequences without reading their tokens.
        self.random_access = all(isinstance(s, RandomAccessStream) for s in streams)
        self.spans: list[list[int]] = []
        self._exhausted = [False] * len(streams)

    def _shares(self, phase: int) -> list[float]:
        overrides = self.schedule[phase].weights if phase >= 0 else {}
        weights = [overrides.get(s.source.label, s.source.weight) for s in self.streams]
        total_weight = sum(weights)
        return [w / total_weight for w in weights]

    def _update_phase(self) -> None:
        total = sum(self.source_tokens) * self.mixture_scale
        phase = -1
        for index, entry in enumerate(self.schedule):
            if total >= entry.after_tokens:
                phase = index
        if phase != self.phase:
            self.phase = phase
            self.shares = self._shares(phase)
            self.phase_start_tokens = list(self.source_tokens)

    def _pick_source(self) -> int | None:
        self._update_phase()
        counts = [n - s for n, s in zip(self.source_tokens, self.phase_start_tokens, strict=True)]
        total = sum(counts)
        best, best_deficit = None, float("-inf")
        for index, share in enumerate(self.shares):
            if self._exhausted[index] or share == 0:
                continue
            deficit = share * (total + 1) - counts[index]
            if deficit > best_deficit:
                best, best_deficit = index, deficit
        return best

    def _fill_spans(self) -> bool:
        while sum(end - start for _, _, start, end in self.spans) < self.seq_len + 1:
            index = self._pick_source()
            if index is None:
                return False
            stream = self.streams[index]
            assert isinstance(stream, RandomAccessStream)
            span = stream.next_document_span()
            if span is None:
                self._exhausted[index] = True
                continue
            document, length = span
            self.source_tokens[index] += length
            self.spans.append([index, document, 0, length])
        return True

    def _cut_spans(self, read: bool) -> list[int]:
        """Read (if `read`) the next seq_len + 1 tokens, then drop seq_len of them."""
        tokens: list[int] = []
        if read:
            wanted = self.seq_len + 1
            for index, document, start, end in self.spans:
                take = min(end - start, wanted - len(tokens))
                stream = self.streams[index]
                assert isinstance(stream, RandomAccessStream)
                tokens += stream.read_tokens(document, start, start + take)
                if len(tokens) == wanted:
                    break
        drop = self.seq_len
        while drop:
            span = self.spans[0]
            step = min(span[3] - span[2], drop)
            span[2] += step
            drop -= step
            if span[2] == span[3]:
                self.spans.pop(0)
        return tokens

    def skip_sequence(self) -> bool:
        """Advance past the next sequence, reading as little as possible; False at the end."""
        if self.random_access:
            if not self._fill_spans():
                return False
            self._cut_spans(read=False)
            return True
        return self.next_sequence() is not None

    def next_sequence(self) -> torch.Tensor | None:
        """The next (seq_len + 1,) LongTensor, or None at the end of non-looping sources."""
        if self.random_access:
            if not self._fill_spans():
                return None
            return torch.tensor(self._cut_spans(read=True), dtype=torch.long)
        while len(self.buffer) < self.seq_len + 1:
            index = self._pick_source()
            if index is None:
                return None
            tokens = self.streams[index].next_document()
            if tokens is None:
                self._exhausted[index] = True
                continue
            self.source_tokens[index] += len(tokens)
            self.buffer.extend(tokens)
        sequence = torch.tensor(self.buffer[: self.seq_len + 1], dtype=torch.long)
        del self.buffer[: self.seq_len]
        return sequence

    def __iter__(self) -> Iterator[torch.Tensor]:
        while (sequence := self.next_sequence()) is not None:
            yield sequence

    def tokens_by_source(self) -> dict[str, int]:
        return {s.source.label: n for s, n in zip(self.streams, self.source_tokens, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "sources": [s.state_dict() for s in self.streams],
            "source_tokens": list(self.source_tokens),
            "phase": self.phase,
            "phase_start_tokens": list(self.phase_start_tokens),
            "buffer": list(self.buffer),
            "spans": [list(span) for span in self.spans],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.streams):
            raise DataError(
                f"data state has {len(state['sources'])} sources, config has {len(self.streams)}"
            )
        for stream, stream_state in zip(self.streams, state["sources"], strict=True):
            stream.load_state_dict(stream_state)
        self.source_tokens = [int(n) for n in state["source_tokens"]]
        self.phase = int(state.get("phase", -1))
        self.shares = self._shares(self.phase) if self.phase < len(self.schedule) else self.shares
        self.phase_start_tokens = [
            int(n) for n in state.get("phase_start_tokens", [0] * len(self.streams))
        ]
        self.buffer = [int(t) for t in state["buffer"]]
        self.spans = [[int(v) for v in span] for span in state.get("spans", [])]
        self._exhausted = [False] * len(self.streams)


def build_packed_sequences(
    sources: list[SourceConfig],
    split: str,
    tokenizer: Tokenizer,
    data_config: DataConfig,
    skips: SkipCounter,
    loop: bool,
) -> PackedSequences:
    """A packed stream over `sources` for `split`.

    With `data.prepared`, documents come from the memory-mapped shards of `scaletrain data
    prepare` (checked against the tokenizer's fingerprint); otherwise they are read and
    tokenized on the fly. Both give the same kind of resumable, world-size-free state.
    """
    schedule = data_config.mixture_schedule if split == "train" else []
    streams: list[DocumentStream]
    if data_config.prepared and split in ("train", "validation"):
        from data_pipeline.shards import open_prepared_streams

        streams = list(
            open_prepared_streams(
                data_config.prepared, sources, split, tokenizer, data_config, loop
            )
        )
    else:
        streams = [SourceStream(s, split, tokenizer, data_config, skips, loop) for s in sources]
    return PackedSequences(streams, data_config.seq_len, schedule)


class GlobalBatchLoader:
    """Cuts each global batch of sequences into this rank's micro-batches.

    Global batch `g` is sequences [g*B, (g+1)*B) of the packed stream, whatever the world size;
    rank r takes a contiguous B/world slice, split into micro-batches. The state is the stream's
    state at a global-batch boundary, so it is the same on every rank and every world size.
    Sequences outside the slice are passed with the stream's optional `skip_sequence()`, which
    over prepared shards reads no tokens at all.
    """

    def __init__(
        self,
        sequences: PackedSequences,
        global_batch_seqs: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        eos_id: int | None = None,
        document_masking: bool = False,
    ) -> None:
        if global_batch_seqs % (micro_batch_size * world_size):
            raise DataError(
                f"global batch of {global_batch_seqs} sequences is not divisible by "
                f"micro_batch_size {micro_batch_size} x world size {world_size}"
            )
        self.sequences = sequences
        self.global_batch_seqs = global_batch_seqs
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.eos_id = eos_id
        self.document_masking = document_masking

    counts_are_local = False  # every rank counts the whole global stream

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_seqs // (self.micro_batch_size * self.world_size)

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch, as typed batches (labels
        aligned, document ids from the EOS the packer put after each document)."""
        from data_pipeline.batch import causal_lm_batch  # batch.py imports this module

        return [
            causal_lm_batch(chunk, self.eos_id, self.document_masking)
            for chunk in self.next_rows().split(self.micro_batch_size)
        ]

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next global batch, each (inputs, labels) of (b, T)."""
        return [(b.input_ids, b.labels) for b in self.next_step()]

    def next_rows(self) -> torch.Tensor:
        """This rank's sequences of the next global batch, (B / world, T + 1)."""
        per_rank = self.global_batch_seqs // self.world_size
        first, last = self.rank * per_rank, (self.rank + 1) * per_rank
        skip = getattr(self.sequences, "skip_sequence", None)
        batch = []
        for index in range(self.global_batch_seqs):
            if skip is not None and not first <= index < last:
                # Other ranks' sequences: over prepared shards, not even read from disk.
                if not skip():
                    raise DataError("training data ran out (the training sources should loop)")
                continue
            sequence = self.sequences.next_sequence()
            if sequence is None:
                raise DataError("training data ran out (the training sources should loop)")
            batch.append(sequence)
        return torch.stack(batch)

    def state_dict(self, gather: Any = None) -> dict[str, Any]:
        """The stream's state; already global (`gather` is not needed)."""
        return self.sequences.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sources" not in state:
            raise DataError(
                "the checkpoint's data position is for streaming logical shards, not prepared "
                "shards; resume with the same data setup"
            )
        self.sequences.load_state_dict(state)

    def tokens_by_source(self) -> dict[str, int]:
        return self.sequences.tokens_by_source()

    def close(self) -> None:
        """Nothing runs in the background here (the interface of `ShardedBatchLoader`)."""


def document_segments(inputs: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document boundaries of packed `inputs` (B, T), for document-masked attention.

    Returns (segment_ids, position_ids), both (B, T): tokens share a segment id when they
    belong to the same document (a document ends with its EOS, so the token after an EOS
    starts a new segment), and positions restart at 0 in each segment. Attention may then be
    restricted to `segment_ids[:, :, None] == segment_ids[:, None, :]` (plus causality),
    and RoPE may use `position_ids`.
    """
    is_eos = (inputs == eos_id).long()
    # A token's segment is the number of EOS tokens strictly before it.
    segment_ids = torch.cumsum(is_eos, dim=1) - is_eos
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    starts = torch.zeros_like(inputs)
    starts[:, 1:] = is_eos[:, :-1] * index[:, 1:]
    segment_start = torch.cummax(starts, dim=1).values
    return segment_ids, index - segment_start


def validation_sequences(
    source: SourceConfig,
    tokenizer: Tokenizer,
    data_config: DataConfig,
    count: int,
    split: str = "validation",
) -> list[torch.Tensor]:
    """Up to `count` fixed (seq_len + 1,) sequences of one source's `split`, packed without
    looping (the same ones every time); its bad records are skipped, not counted."""
    stream = build_packed_sequences(
        [source], split, tokenizer, data_config, SkipCounter(data_config.strict), loop=False
    )
    return [sequence for _, sequence in zip(range(count), stream, strict=False)]
