"""Next-token cross-entropy, summed over target positions (labels != -100).

Objectives divide the sum by the global count of target tokens of the optimizer step, so the
one function serves training (sum / global count) and evaluation (sum, count).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from data_pipeline.batch import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(label) over positions whose label is not IGNORE_INDEX, in fp32.

    logits (..., V), labels (...) long.
    """
    return F.cross_entropy(
        logits.float().flatten(0, -2),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


#: Tokens per chunk of the chunked loss: 1024 x 128K vocab of fp32 logits is 512 MiB.
DEFAULT_CHUNK_TOKENS = 1024


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_t -log softmax(hidden_t @ weight.T)[label_t] over rows, one chunk of rows at a time.

    The forward computes each chunk's logits, its loss and, when gradients are wanted, the
    chunk's gradients with respect to its hidden rows and the weight, then frees the logits;
    backward only scales the stored gradients by the incoming scalar. The extra memory is one
    (chunk, V) block of fp32 logits instead of (N, V), at no extra matmul (recomputing the
    logits in backward instead would cost a third projection).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_tokens: int,
        needs_grad: bool,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        # The weight gradient sums over every chunk: kept in fp32, cast once in backward.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = hidden[start : start + chunk_tokens]  # (C, d)
            targets = labels[start : start + chunk_tokens].unsqueeze(1)  # (C, 1)
            # The plain path's op order (project in the model dtype, then fp32), so that fp32
            # results agree with cross_entropy_sum to rounding.
            logits = F.linear(rows, weight).float()  # (C, V)
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (C, 1)
            total += (log_norm - logits.gather(1, targets)).sum()
            if grad_hidden is None or grad_weight is None:
                continue
            # d loss / d logits = softmax - onehot(label), built in place over the logits.
            grad_logits = logits.sub_(log_norm).exp_()
            grad_logits.scatter_add_(1, targets, torch.full_like(log_norm, -1.0))
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start : start + chunk_tokens] = grad_logits @ weight  # (C, d)
            grad_weight += (grad_logits.t() @ rows).float()  # (V, d)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()
        return (
            (grad_hidden * scale).to(grad_hidden.dtype),
            (grad_weight * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """`cross_entropy_sum(F.linear(hidden, weight), labels)` without the full logits.

    hidden (..., d): final-norm hidden states (`Transformer.hidden_states`); weight (V, d): the
    output projection (`Transformer.output_weight`); labels (...) long, IGNORE_INDEX = no loss.
    Only rows with a label are projected, `chunk_tokens` at a time; forward and backward hold
    one (chunk_tokens, V) fp32 block of logits, never (tokens, V). Returns the fp32 sum, with
    gradients for `hidden` and `weight` (exact: the same math as the plain path, summed in
    another order).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens: must be positive, got {chunk_tokens}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    # Rows without a target (prompt tokens, padding) cost nothing: they are never projected.
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    # Gradients are computed in the forward, so only when backward can come (not in eval).
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss = _ChunkedLinearCrossEntropy.apply(
        flat_hidden.index_select(0, keep),
        weight,
        flat_labels.index_select(0, keep),
        chunk_tokens,
        needs_grad,
    )
    return cast(torch.Tensor, loss)
