"""The routed experts: E SwiGLU MLPs stored as stacked weights and run as a grouped matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm_offsets(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """End offsets (E,) int32 of each expert's rows in the expert-sorted token matrix.

    `torch._grouped_mm` takes these: group e is rows [offsets[e-1], offsets[e]), empty groups
    allowed. E.g. tokens_per_expert [2, 0, 3] -> [2, 2, 5].
    """
    return torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)


# Rows per group are padded to a multiple of this: the weight-gradient grouped GEMM reduces over
# rows, and its kernels want each group's start 16-byte aligned (8 bf16 rows; 16 leaves room
# for fp8), as torchtitan does.
GROUP_ALIGN_ROWS = 16


def padded_group_layout(
    tokens_per_expert: torch.Tensor, align: int = GROUP_ALIGN_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded counts (E,), destination row (M,) of each expert-sorted row in the padded matrix).

    E.g. counts [2, 0, 3] with align 4 -> padded [4, 0, 4], destinations [0, 1, 4, 5, 6].
    """
    padded = (tokens_per_expert + align - 1) // align * align  # (E,)
    padded_starts = torch.cumsum(padded, 0) - padded
    starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    expert_of_row = torch.repeat_interleave(
        torch.arange(tokens_per_expert.numel(), device=tokens_per_expert.device),
        tokens_per_expert,
    )  # (M,)
    rows = torch.arange(expert_of_row.numel(), device=tokens_per_expert.device)
    return padded, padded_starts[expert_of_row] + rows - starts[expert_of_row]


def use_grouped_mm(x: torch.Tensor) -> bool:
    """Grouped GEMM kernels exist for bf16 on CUDA; elsewhere we loop over experts."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


class GroupedExperts(nn.Module):
    """E SwiGLU experts with weights (E, out, in), like E stacked `nn.Linear` weights.

    The leading expert dimension is what expert parallelism splits: each rank computes a block
    of E / ep experts (`first_expert`); this module has no notion of ranks. Input rows must be
    sorted by expert: `tokens_per_expert[e]` consecutive rows for expert e, in expert order.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def forward(
        self,
        x: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        grouped: bool | None = None,
        first_expert: int = 0,
    ) -> torch.Tensor:
        """Expert outputs (M, dim) for expert-sorted rows x (M, dim).

        `tokens_per_expert` (G,) covers experts first_expert .. first_expert + G - 1 (all E by
        default; an expert-parallel rank passes its own block). `grouped` forces the
        `torch._grouped_mm` path (True) or the per-expert loop (False); None picks grouped GEMM
        on CUDA in bf16.
        """
        experts = slice(first_expert, first_expert + tokens_per_expert.numel())
        weights = (self.gate_proj[experts], self.up_proj[experts], self.down_proj[experts])
        if grouped is None:
            grouped = use_grouped_mm(x)
        if grouped:
            return self._forward_grouped(x, tokens_per_expert, *weights)
        return self._forward_loop(x, tokens_per_expert, *weights)

    def _forward_loop(
        self,
        x: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
    ) -> torch.Tensor:
        outputs = []
        # unbind, not weight[e]: its backward stacks the gradients once instead of adding one
        # full-size zero-padded gradient per expert.
        gates, ups, downs = gate_proj.unbind(0), up_proj.unbind(0), down_proj.unbind(0)
        for rows, gate, up, down in zip(
            x.split(tokens_per_expert.tolist()), gates, ups, downs, strict=True
        ):  # rows (count, dim): contiguous slices of the sorted tokens, no gather
            hidden = F.silu(F.linear(rows, gate)) * F.linear(rows, up)  # (count, hidden)
            outputs.append(F.linear(hidden, down))
        if not outputs:
            return x.new_zeros(0, down_proj.shape[1])
        return torch.cat(outputs)

    def _forward_grouped(
        self,
        x: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
    ) -> torch.Tensor:
        padded, destination = padded_group_layout(tokens_per_expert)
        offsets = grouped_mm_offsets(padded)
        # Zero rows pad each group; they cost a little compute and get no gradient back.
        x_padded = x.new_zeros(int(padded.sum()), x.shape[1]).index_copy(0, destination, x)
        # _grouped_mm: (M, in) x (E, in, out) with row groups -> (M, out)
        gate = torch._grouped_mm(x_padded, gate_proj.transpose(-2, -1), offs=offsets)
        up = torch._grouped_mm(x_padded, up_proj.transpose(-2, -1), offs=offsets)
        hidden = F.silu(gate) * up  # (M_padded, hidden)
        out = torch._grouped_mm(hidden, down_proj.transpose(-2, -1), offs=offsets)
        return out[destination]  # (M, dim)
