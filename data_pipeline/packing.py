"""Token streams: a weighted mixture of sources, tokenized and packed into fixed-length sequences.

Every piece here has a `state_dict()` that pins the exact next token, and the state does not
depend on the number of ranks: ranks take their slice of each *global* batch (see
`GlobalBatchLoader`), so a checkpoint resumes exactly on any world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import SkipCounter, iter_documents
from data_pipeline.tokenizer import Tokenizer


class SourceStream:
    """Tokenized documents of one source, looping over epochs, resumable by document count."""

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
        self.docs_consumed = 0  # documents taken from the current epoch
        self._documents: Iterator[str] | None = None

    def _open(self) -> Iterator[str]:
        documents = iter_documents(
            self.source,
            self.split,
            self.skips,
            epoch=self.epoch,
            shuffle_seed=self.data_config.shuffle_seed,
            validation_percent=self.data_config.builtin_validation_percent,
        )
        for _ in range(self.docs_consumed):  # fast-forward on resume (read, not tokenized)
            next(documents, None)
        return documents

    def next_document(self) -> list[int] | None:
        """The next document's tokens followed by EOS, or None when a non-looping source ends."""
        for _ in range(2):
            if self._documents is None:
                self._documents = self._open()
            text = next(self._documents, None)
            if text is not None:
                self.docs_consumed += 1
                return [*self.tokenizer.encode(text), self.tokenizer.eos_id]
            if not self.loop:
                return None
            if self.docs_consumed == 0:
                raise DataError(f"{self.source.path}: source yields no usable documents")
            self.epoch += 1
            self.docs_consumed = 0
            self._documents = None
        raise DataError(f"{self.source.path}: source yields no usable documents")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "docs_consumed": self.docs_consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.docs_consumed = int(state["docs_consumed"])
        self._documents = None


class PackedSequences:
    """Fixed-length sequences of seq_len + 1 tokens cut from a weighted mixture of sources.

    Consecutive sequences overlap by one token, so the inputs (seq[:-1]) tile the token stream
    and every token is predicted exactly once. The mixture is deterministic: the next document
    comes from the source furthest below its token share (weight / sum of weights).
    """

    def __init__(self, streams: list[SourceStream], seq_len: int) -> None:
        if not streams:
            raise DataError("no data sources")
        self.streams = streams
        self.seq_len = seq_len
        total_weight = sum(s.source.weight for s in streams)
        self.shares = [s.source.weight / total_weight for s in streams]
        self.source_tokens = [0] * len(streams)
        self.buffer: list[int] = []
        self._exhausted = [False] * len(streams)

    def _pick_source(self) -> int | None:
        total = sum(self.source_tokens)
        best, best_deficit = None, float("-inf")
        for index, share in enumerate(self.shares):
            if self._exhausted[index]:
                continue
            deficit = share * (total + 1) - self.source_tokens[index]
            if deficit > best_deficit:
                best, best_deficit = index, deficit
        return best

    def next_sequence(self) -> torch.Tensor | None:
        """The next (seq_len + 1,) LongTensor, or None at the end of non-looping sources."""
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
            "buffer": list(self.buffer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.streams):
            raise DataError(
                f"data state has {len(state['sources'])} sources, config has {len(self.streams)}"
            )
        for stream, stream_state in zip(self.streams, state["sources"], strict=True):
            stream.load_state_dict(stream_state)
        self.source_tokens = [int(n) for n in state["source_tokens"]]
        self.buffer = [int(t) for t in state["buffer"]]
        self._exhausted = [False] * len(self.streams)


def build_packed_sequences(
    sources: list[SourceConfig],
    split: str,
    tokenizer: Tokenizer,
    data_config: DataConfig,
    skips: SkipCounter,
    loop: bool,
) -> PackedSequences:
    """A packed stream over `sources` for `split`."""
    streams = [SourceStream(s, split, tokenizer, data_config, skips, loop) for s in sources]
    return PackedSequences(streams, data_config.seq_len)


class GlobalBatchLoader:
    """Cuts each global batch of sequences into this rank's micro-batches.

    Global batch `g` is sequences [g*B, (g+1)*B) of the packed stream, whatever the world size;
    rank r takes a contiguous B/world slice, split into micro-batches. The state is the stream's
    state at a global-batch boundary, so it is the same on every rank and every world size.
    """

    def __init__(
        self,
        sequences: PackedSequences,
        global_batch_seqs: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
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

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_seqs // (self.micro_batch_size * self.world_size)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next global batch, each (inputs, labels) of (b, T)."""
        batch = []
        for _ in range(self.global_batch_seqs):
            sequence = self.sequences.next_sequence()
            if sequence is None:
                raise DataError("training data ran out (the training sources should loop)")
            batch.append(sequence)
        per_rank = self.global_batch_seqs // self.world_size
        mine = torch.stack(batch[self.rank * per_rank : (self.rank + 1) * per_rank])
        return [
            (chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())
            for chunk in mine.split(self.micro_batch_size)
        ]

    def state_dict(self) -> dict[str, Any]:
        return self.sequences.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sequences.load_state_dict(state)
