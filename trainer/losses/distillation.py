"""Distillation divergences between a teacher's and a student's next-token distributions.

With teacher logits z_t and student logits z_s at one target position and a temperature T,
p = softmax(z_t / T) (teacher) and q = softmax(z_s / T) (student):

    forward_kl   KL(p || q) = sum_v p (log p - log q)          (mean-seeking, classic KD)
    reverse_kl   KL(q || p) = sum_v q (log q - log p)          (mode-seeking)
    jsd          beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,
                 the generalised Jensen-Shannon divergence (beta = 0.5: the symmetric JSD;
                 0 < beta < 1, the mixture would equal one side at the ends)

Each divergence is multiplied by T^2: the gradient of a softened divergence with respect to
the logits scales as 1/T (forward KL: (q - p) / T), so T^2 keeps its size comparable to the
plain cross-entropy it is mixed with as T changes (Hinton et al., 2015).

The result is the SUM over target positions (labels != -100); the objective divides by the
global count of target tokens, as for `cross_entropy_sum`. Logits are computed chunk by chunk
from hidden states and output weights, so the (tokens x vocab) distributions of the two models
exist for one chunk at a time, in the forward and again in the backward (which recomputes
each chunk instead of storing it). The teacher is frozen: it receives no gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.batch import IGNORE_INDEX

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence (N,) between (N, V) student and teacher logits, times T^2.

    In fp32; the unchunked reference that `distillation_loss_sum` computes chunk by chunk.
    """
    _check(kind, beta, temperature)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        # log m by logsumexp, so m is never rounded to 0 where one side is tiny.
        log_m = torch.logsumexp(
            torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0
        )
        kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
        per_token = beta * kl_p + (1.0 - beta) * kl_q
    return per_token * temperature**2


def _check(kind: str, beta: float, temperature: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"distillation loss {kind!r} is not one of {', '.join(DIVERGENCES)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")


def _chunk_sum(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden.float(), teacher_weight.float())
    student_logits = F.linear(student_hidden.float(), student_weight.float())
    return divergence_from_logits(student_logits, teacher_logits, kind, beta, temperature).sum()


class _ChunkedDivergence(torch.autograd.Function):
    """Sum of divergences over rows, chunk by chunk; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        kind: str,
        beta: float,
        temperature: float,
        chunk_size: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight)
        ctx.options = (kind, beta, temperature, chunk_size)
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        for start in range(0, student_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            total += _chunk_sum(
                student_hidden[rows],
                student_weight,
                teacher_hidden[rows],
                teacher_weight,
                kind,
                beta,
                temperature,
            )
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student_hidden, student_weight, teacher_hidden, teacher_weight = ctx.saved_tensors
        kind, beta, temperature, chunk_size = ctx.options
        grad_hidden = torch.zeros_like(student_hidden)
        grad_weight = torch.zeros_like(student_weight)
        weight = student_weight.detach().requires_grad_(True)
        for start in range(0, student_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hidden = student_hidden[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                chunk = _chunk_sum(
                    hidden,
                    weight,
                    teacher_hidden[rows],
                    teacher_weight,
                    kind,
                    beta,
                    temperature,
                )
                d_hidden, d_weight = torch.autograd.grad(chunk, (hidden, weight))
            grad_hidden[rows] = d_hidden
            grad_weight += d_weight
        return (
            grad_hidden * grad_total,
            grad_weight * grad_total,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def distillation_loss_sum(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sum over target positions of the `kind` divergence (see the module docstring), times T^2.

    student_hidden (N, d_s) and student_weight (V, d_s): the student's final hidden states and
    output projection (`Transformer.hidden_states(...).flatten(0, 1)`, `.output_weight`);
    teacher_hidden (N, d_t), teacher_weight (V, d_t) the teacher's; labels (N,) with -100 where
    there is no target. Gradients flow to the student's hidden states and weight only. Equal
    to `divergence_from_logits` on the full logits, summed over the target rows.
    """
    _check(kind, beta, temperature)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student vocabulary {student_weight.shape[0]} != teacher vocabulary "
            f"{teacher_weight.shape[0]}: distillation needs one tokenizer"
        )
    if not (student_hidden.shape[0] == teacher_hidden.shape[0] == labels.numel()):
        raise ValueError(
            f"rows differ: student {student_hidden.shape[0]}, teacher {teacher_hidden.shape[0]}, "
            f"labels {labels.numel()}"
        )
    # Only target rows are projected to the vocabulary: prompt and padding cost nothing.
    targets = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(-1)
    result: torch.Tensor = _ChunkedDivergence.apply(
        student_hidden.index_select(0, targets),
        student_weight,
        teacher_hidden.detach().index_select(0, targets),
        teacher_weight.detach(),
        kind,
        beta,
        temperature,
        chunk_size,
    )
    return result
