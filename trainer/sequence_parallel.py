"""Sequence parallelism (`parallel.sequence_parallel: P`) through DeepSpeed's Ulysses.

Ranks form consecutive groups of P ([0, 1], [2, 3], ... for P = 2). The ranks of a group train
on the same sequences, each on a contiguous T/P slice of every row: embeddings, norms, the MLP
and the loss see only the slice. Inside every attention layer, after RoPE (rotated by the
positions of the FULL sequence, sliced), DeepSpeed's `DistributedAttention` turns q, k, v from
(B, T/P, H, D) into (B, T, H/P, D) with an all-to-all over the group; the model's own `attend`
then runs unchanged on whole sequences with H/P heads, under an `AttentionSpec` built from the
group's gathered document ids (so windows, documents and global tokens are those of the full
sequence); a second all-to-all brings the output back to (B, T/P, H*D) before o_proj.

The loop needs nothing else: each rank counts and sums the target tokens of its slice, so the
global unit count and the summed losses are those of the unsplit batch, and the gradients
every rank's backward produces (through the all-to-alls' backward) add up over all ranks to
the full gradient. To DeepSpeed every rank is an ordinary data-parallel rank, so ZeRO 0-3
applies unchanged; the data-parallel size of the *data* is world / P (the loader deals the
same micro-batches to every rank of a group).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.batch import Batch
from model.attention import Attention
from model.attention_paths import AttentionSpec, attend
from model.config import ModelConfig
from model.masking import positions_within_documents

#: The key under which the group-wide spec is cached in a forward's shared AttentionSpec.
_GLOBAL_SPEC = "sequence_parallel"


def check_sequence_parallel(
    sequence_parallel: int, model: ModelConfig, seq_len: int, world_size: int
) -> str | None:
    """Why `parallel.sequence_parallel` cannot run on `world_size` ranks, or None when it can."""
    sp = sequence_parallel
    if sp == 1:
        return None
    key = f"parallel.sequence_parallel: {sp}"
    if world_size % sp:
        return f"{key} does not divide the world size {world_size}"
    if model.n_heads % sp:
        return f"{key} does not divide model.n_heads {model.n_heads}"
    if model.kv_heads % sp:
        # Ulysses hands each rank whole key/value heads; a GQA group must not be torn apart.
        return f"{key} does not divide the {model.kv_heads} key/value heads (model.n_kv_heads)"
    if seq_len % sp:
        return f"{key} does not divide data.seq_len {seq_len}"
    return None


def data_parallel_rank(rank: int, world_size: int, sequence_parallel: int) -> tuple[int, int]:
    """(rank, size) of the data: the ranks of a group of P consecutive ranks read the same."""
    return rank // sequence_parallel, world_size // sequence_parallel


def full_positions(batch: Batch, reset_per_document: bool) -> torch.Tensor:
    """The RoPE positions (B, T) the model would use on the whole rows of `batch`."""
    if batch.positions is not None:
        return batch.positions
    if batch.doc_ids is not None and reset_per_document:
        return positions_within_documents(batch.doc_ids)
    rows, seq = batch.input_ids.shape
    return torch.arange(seq, device=batch.input_ids.device).expand(rows, seq)


def slice_batch(batch: Batch, sp_rank: int, sp_size: int, reset_per_document: bool) -> Batch:
    """This rank's contiguous T/P slice of every row; positions computed on the full rows first.

    Per-row extras (margins, example ids) are kept whole: they do not run along the sequence.
    """
    if sp_size == 1:
        return batch
    seq = batch.input_ids.shape[1]
    if seq % sp_size:
        raise ValueError(f"a batch of {seq} tokens per row does not split over {sp_size} ranks")
    width = seq // sp_size
    start, end = sp_rank * width, (sp_rank + 1) * width
    positions = full_positions(batch, reset_per_document)

    def cut(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[:, start:end].contiguous()

    return replace(
        batch,
        input_ids=batch.input_ids[:, start:end].contiguous(),
        labels=batch.labels[:, start:end].contiguous(),
        doc_ids=cut(batch.doc_ids),
        positions=cut(positions),
        pad_mask=cut(batch.pad_mask),
    )


def global_spec(
    spec: AttentionSpec | None, doc_ids: torch.Tensor | None, seq_len: int, window: int | None
) -> AttentionSpec | None:
    """The spec of the whole sequence from a slice's spec and the group's gathered doc ids.

    None (plain causal attention) only where the slice's was None and the layer has no window.
    """
    if spec is None:
        return None if window is None else AttentionSpec(seq_len=seq_len)
    return AttentionSpec(
        seq_len=seq_len,
        doc_ids=doc_ids,
        global_tokens=spec.global_tokens,
        force_path=spec.force_path,
    )


def _local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec | None,
    window: int | None,
) -> torch.Tensor:
    """The model's own attention on whole sequences: (B, T, h, D) in and out, h = H/P heads."""
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec, window)
    return out.transpose(1, 2)  # (B, T, h, D)


class UlyssesAttention:
    """`Attention.sequence_parallel` for one rank of a sequence-parallel group.

    A plain callable, not a module: the model's parameters and state_dict stay as they were.
    """

    def __init__(self, group: dist.ProcessGroup, n_kv_heads: int) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        self.group = group
        self.size = dist.get_world_size(group)
        # (B, T/P, H, D): heads are scattered (dim 2), the sequence gathered (dim 1).
        self.attention = DistributedAttention(
            _local_attention, group, scatter_idx=2, gather_idx=1, num_kv_heads=n_kv_heads
        )

    def gathered_doc_ids(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """The group's doc ids (B, T) from this rank's (B, T/P) (a collective in the group)."""
        parts = [torch.empty_like(doc_ids) for _ in range(self.size)]
        dist.all_gather(parts, doc_ids.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        spec: AttentionSpec | None,
        window: int | None,
    ) -> torch.Tensor:
        seq_len = q.shape[1] * self.size
        if spec is not None and _GLOBAL_SPEC in spec._masks:
            whole = spec._masks[_GLOBAL_SPEC]  # built by the forward's first layer
        else:
            doc_ids = None
            if spec is not None and spec.doc_ids is not None:
                doc_ids = self.gathered_doc_ids(spec.doc_ids)
            whole = global_spec(spec, doc_ids, seq_len, window)
            if spec is not None:  # shared by every layer of this forward (and its recompute)
                spec._masks[_GLOBAL_SPEC] = whole
        out: torch.Tensor = self.attention(q, k, v, 0, None, whole, window)
        return out  # (B, T/P, H, D)


def sequence_parallel_group(sp: int) -> dist.ProcessGroup | None:
    """This rank's group of `sp` consecutive ranks (every rank creates every group)."""
    world = dist.get_world_size()
    groups = [list(range(start, start + sp)) for start in range(0, world, sp)]
    mine, _ = dist.new_subgroups_by_enumeration(groups)
    return mine


def apply_sequence_parallel(model: Any, sp: int) -> int:
    """Give every attention layer of `model` the Ulysses all-to-alls; returns how many."""
    if sp == 1:
        return 0
    group = sequence_parallel_group(sp)
    assert group is not None
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for attention in layers:
        attention.sequence_parallel = UlyssesAttention(group, attention.n_kv_heads)
    return len(layers)
