"""Reference log-probs computed once and kept on disk (`dpo.precompute_reference`).

DPO needs log pi_ref(y | x) for every chosen and rejected completion. They never change
during training, so they can be computed in one pass before training and the reference model
dropped. The cache is only valid for exactly the numbers that produced it, so it is stored
under a key of everything that decides them: the reference weights' SHA-256, the tokenizer
and chat template, the data, the truncation policy, seq_len and dtype. A matching key is
reused; a different key is refused with one line naming the first field that differs.

One safetensors file, written under a temporary name and renamed into place, so a crash
while writing never leaves a cache that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from data_pipeline.batch import Batch
from trainer.checkpointing.checkpoint import TMP_PREFIX, CheckpointError
from trainer.losses.preference import sequence_logps

CACHE_FILE = "reference_logps.safetensors"
EXAMPLE_IDS = "example_ids"  # Batch.extras: (num_pairs,) long, the pair's index in the dataset
REFERENCE_CHOSEN = "reference_chosen_logps"  # Batch.extras filled by `attach_reference_logps`
REFERENCE_REJECTED = "reference_rejected_logps"


class IndexedBatches(Protocol):
    """Batches by index: a list, or a view that collates each one when it is asked for."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Batch: ...


def model_weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers: names, dtypes, shapes and bytes, in name
    order. Two models hash equal exactly when their state dicts are bit-identical."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_sha256(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the names and contents of data files (a data fingerprint), read in chunks."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).name}\n".encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """SHA-256 of a string (a chat template's source)."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ReferenceCacheKey:
    """Everything that decides the cached numbers; all must match for the cache to be used."""

    reference_sha256: str
    tokenizer_sha256: str
    chat_template_sha256: str
    data_fingerprint: str
    truncation: str
    seq_len: int
    dtype: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def first_difference(self, other: ReferenceCacheKey) -> str | None:
        """The name of the first field that differs, None when equal."""
        for field in dataclasses.fields(self):
            if getattr(self, field.name) != getattr(other, field.name):
                return field.name
        return None


class ReferenceCache:
    """Per-example reference log-probs (chosen, rejected) in `folder/reference_logps.safetensors`."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / CACHE_FILE

    def load(self, key: ReferenceCacheKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(chosen, rejected), each (num_examples,) float32 indexed by example id; None when
        there is no complete cache; CheckpointError when it was made for a different key."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                chosen = handle.get_tensor("chosen")
                rejected = handle.get_tensor("rejected")
        except Exception as exc:  # safetensors raises its own types for damaged files
            raise CheckpointError(f"{self.path}: unreadable reference cache ({exc})") from None
        try:
            stored = ReferenceCacheKey(**json.loads(metadata["key"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: reference cache without a valid key") from None
        field = key.first_difference(stored)
        if field is not None:
            raise CheckpointError(
                f"{self.path}: made for a different {field} ({getattr(stored, field)!r:.24}, "
                f"now {getattr(key, field)!r:.24}); delete it or restore the original"
            )
        return chosen, rejected

    def save(self, key: ReferenceCacheKey, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Write the cache complete-or-invisible: a temporary file, fsynced, then renamed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}")
        tensors = {"chosen": chosen.float().contiguous(), "rejected": rejected.float().contiguous()}
        save_file(tensors, tmp, {"key": key.to_json(), "format": "pt"})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)


@torch.no_grad()
def compute_reference_logps(
    reference: nn.Module,
    batches: IndexedBatches,
    num_examples: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of every pair under `reference`, by example id, in fp32.

    Each of `batches` (a list, or batches made when indexed) holds `num_pairs` chosen rows
    then as many rejected rows, and `extras["example_ids"]`; together they must cover every
    id in [0, num_examples) (a missing one is a bug in the caller, so it raises).

    With several ranks the batches are dealt round-robin, and every rank runs the same number
    of forwards (a rank with fewer batches runs one again and drops its result), because a
    sharded reference (trainer/frozen.py) gathers its weights collectively in every forward.
    The ranks' results are then combined exactly: each value comes from the one rank that
    computed it (an all-reduce MAX over -inf elsewhere), on `device` (the backend's).
    """
    rank, world = 0, 1
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    chosen = torch.full((num_examples,), float("-inf"))
    rejected = torch.full((num_examples,), float("-inf"))
    mine = list(range(rank, len(batches), world))
    forwards = -(-len(batches) // world)  # the most any rank has
    was_training = reference.training
    reference.eval()
    try:
        for k in range(forwards):
            if k < len(mine):
                batch = batches[mine[k]]
                logps = batch_sequence_logps(reference, batch)[0].cpu()
                ids = batch.extras[EXAMPLE_IDS].cpu()
                chosen[ids] = logps[: batch.num_pairs]
                rejected[ids] = logps[batch.num_pairs :]
            else:  # padding: keeps this rank's forwards in step with the others'
                batch_sequence_logps(reference, batches[mine[-1] if mine else 0])
    finally:
        reference.train(was_training)
    if world > 1:
        both = torch.stack([chosen, rejected]).to(device or torch.device("cpu"))
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        chosen, rejected = both.cpu().unbind(0)
    missing = ~(torch.isfinite(chosen) & torch.isfinite(rejected))
    if missing.any():
        raise ValueError(f"no reference log-probs for {int(missing.sum())} examples")
    return chosen, rejected


def batch_sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, token counts) of each row of a preference batch under a causal LM."""
    logits = model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
    return sequence_logps(logits, batch.labels)


def attach_reference_logps(batch: Batch, chosen: torch.Tensor, rejected: torch.Tensor) -> Batch:
    """`batch` with extras reference_chosen_logps / reference_rejected_logps (num_pairs,)
    looked up by its example ids in the cached tensors."""
    ids = batch.extras[EXAMPLE_IDS].cpu()
    extras = {**batch.extras, REFERENCE_CHOSEN: chosen[ids], REFERENCE_REJECTED: rejected[ids]}
    return dataclasses.replace(batch, extras=extras)
