"""Expert parallelism: each rank of an expert-parallel group computes E / ep of the experts.

Ranks are split into consecutive groups of `parallel.expert_parallel` ranks ([0, 1], [2, 3], ...
for ep = 2). In every MoE layer a rank routes its own tokens, sends each token-expert row to
the rank of its group that owns the expert (all-to-all dispatch), runs its block of experts on
the rows it received from the whole group, and sends the outputs back (all-to-all combine).
The ranks holding the same expert block in different groups form its expert-data-parallel
group.

Weight layout: every rank keeps the full stacked expert weights (E, out, in), so to DeepSpeed
they are ordinary parameters and every ZeRO stage (0-3) applies unchanged; at ZeRO-3 they are
partitioned over all ranks like any other weight. A rank's backward only produces gradients
for its own experts (zeros elsewhere); DeepSpeed's average over all W data-parallel ranks then
equals, for each expert, the sum over its expert-data-parallel group divided by W, which is the
gradient of the global batch: the same update as without expert parallelism. What expert
parallelism saves here is expert compute and activation memory per rank (each rank runs E / ep
experts on the tokens routed to them); expert weight and gradient memory is reduced only by
ZeRO (optimizer states from stage 1, gradients from 2, weights at 3).

DeepSpeed's own MoE layer is not used: its checkpointing expects its module layout
(`deepspeed_moe.experts.deepspeed_experts.N`), and it refuses ZeRO-3.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from model.moe.experts import GroupedExperts
from model.moe.layer import MoEFeedForward
from model.transformer import Transformer


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over rows whose backward sends the gradients back the same way."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = rows.new_empty(sum(output_splits), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty(sum(input_splits), *grad.shape[1:])
        dist.all_to_all_single(
            grad_in, grad.contiguous(), input_splits, output_splits, group=ctx.group
        )
        return grad_in, None, None, None


class AllToAllDispatcher:
    """`MoEFeedForward.dispatcher` for one rank of an expert-parallel group."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(f"{n_experts} experts do not split over {self.size} ranks")
        self.local_experts = n_experts // self.size

    def __call__(
        self, experts: GroupedExperts, rows: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        """Outputs (M, dim) for this rank's expert-sorted rows (M, dim), computed by the
        ranks that own their experts."""
        size, local = self.size, self.local_experts
        send_counts = tokens_per_expert.reshape(size, local)  # rows for rank s's expert j
        recv_counts = torch.empty_like(send_counts)  # rows from rank s for my expert j
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = _AllToAll.apply(rows, recv_splits, send_splits, self.group)  # by source rank
        # Received rows come grouped by source rank, then by expert; the experts want them
        # grouped by expert. A stable sort keeps source order inside each expert.
        expert_of_row = torch.repeat_interleave(
            torch.arange(local, device=rows.device).repeat(size), recv_counts.flatten()
        )
        order = torch.argsort(expert_of_row, stable=True)
        out = experts(
            received[order], recv_counts.sum(0), first_expert=self.rank * local
        )  # (R, dim) by expert
        unsorted = torch.empty_like(out).index_copy(0, order, out)  # back to source order
        return _AllToAll.apply(unsorted, send_splits, recv_splits, self.group)


def expert_parallel_group(ep: int) -> dist.ProcessGroup | None:
    """This rank's group of `ep` consecutive ranks (every rank creates every group)."""
    world = dist.get_world_size()
    groups = [list(range(start, start + ep)) for start in range(0, world, ep)]
    mine, _ = dist.new_subgroups_by_enumeration(groups)
    return mine


def check_expert_parallel(ep: int, n_experts: int, world_size: int) -> str | None:
    """Why `parallel.expert_parallel = ep` cannot run here, or None when it can."""
    if ep == 1:
        return None
    if n_experts == 0:
        return f"parallel.expert_parallel: {ep} needs an MoE model (model.n_experts > 0)"
    if world_size % ep:
        return f"parallel.expert_parallel: {ep} does not divide the world size {world_size}"
    if n_experts % ep:
        return f"parallel.expert_parallel: {ep} does not divide model.n_experts {n_experts}"
    return None


def apply_expert_parallel(model: Transformer, ep: int) -> int:
    """Give every MoE layer an all-to-all dispatcher over this rank's group; returns how many."""
    if ep == 1:
        return 0
    group = expert_parallel_group(ep)
    assert group is not None
    layers = model.moe_layers()
    for moe in layers.values():
        moe.dispatcher = AllToAllDispatcher(group, moe.n_experts)
    return len(layers)


@torch.no_grad()
def update_router_biases(model: Transformer) -> None:
    """Move the aux-loss-free routing biases by the load of the whole global batch.

    Each rank recorded the load of its own micro-batches; summing over all ranks first makes
    every rank apply the same update, which is also the 1-rank update.
    """
    routers = [
        moe.router
        for moe in model.moe_layers().values()
        if isinstance(moe, MoEFeedForward) and moe.router.expert_load is not None
    ]
    if not routers:
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        loads = torch.stack([r.expert_load for r in routers if r.expert_load is not None])
        dist.all_reduce(loads)
        for router, load in zip(routers, loads, strict=True):
            assert router.expert_load is not None
            router.expert_load.copy_(load)
    for router in routers:
        router.update_bias()
