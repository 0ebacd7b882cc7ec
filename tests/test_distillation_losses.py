"""Distillation divergences: closed forms, gradients, chunking and ignored positions."""

from __future__ import annotations

import pytest
import torch

from trainer.losses.distillation import distillation_loss_sum, divergence_from_logits

V = 11


def _softmax64(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = logits.double() / temperature
    e = torch.exp(scaled - scaled.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _hand(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float, t: float):
    """The divergences written out from their definitions, in float64."""
    p, q = _softmax64(teacher, t), _softmax64(student, t)
    if kind == "forward_kl":
        value = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        value = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        value = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    return value * t * t


def _identity_case(n: int = 9, seed: int = 0, scale: float = 3.0):
    """Hidden states that ARE the logits (output weight = identity), so gradients with respect
    to the hidden states are gradients with respect to the student logits."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, V, generator=g) * scale).requires_grad_(True)
    teacher = torch.randn(n, V, generator=g) * scale
    eye = torch.eye(V)
    return student, teacher, eye


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_values_equal_the_definitions(kind: str, temperature: float) -> None:
    student, teacher, eye = _identity_case()
    labels = torch.arange(student.shape[0])
    got = distillation_loss_sum(
        student, eye, teacher, eye, labels, kind, beta=0.3, temperature=temperature, chunk_size=4
    )
    expected = _hand(student.detach(), teacher, kind, 0.3, temperature).sum()
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert expected > 0.1  # random logits: far from 0, so the comparison is not vacuous


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_gradients_equal_closed_forms(temperature: float) -> None:
    student, teacher, eye = _identity_case(seed=1)
    labels = torch.arange(student.shape[0])
    t = temperature
    p, q = _softmax64(teacher, t), _softmax64(student.detach(), t)
    # d/dz T^2 KL(p||q) = T (q - p);  d/dz T^2 KL(q||p) = T q (log q - log p - KL(q||p)).
    forward = distillation_loss_sum(student, eye, teacher, eye, labels, "forward_kl", 0.5, t, 4)
    (grad,) = torch.autograd.grad(forward, student)
    torch.testing.assert_close(grad.double(), t * (q - p), atol=1e-6, rtol=1e-5)
    reverse = distillation_loss_sum(student, eye, teacher, eye, labels, "reverse_kl", 0.5, t, 4)
    (grad,) = torch.autograd.grad(reverse, student)
    kl = (q * (q.log() - p.log())).sum(-1, keepdim=True)
    torch.testing.assert_close(
        grad.double(), t * q * (q.log() - p.log() - kl), atol=1e-6, rtol=1e-5
    )


def test_jsd_gradient_equals_autograd_of_the_definition() -> None:
    student, teacher, eye = _identity_case(seed=2)
    labels = torch.arange(student.shape[0])
    got = distillation_loss_sum(student, eye, teacher, eye, labels, "jsd", 0.7, 1.5, 2)
    (grad,) = torch.autograd.grad(got, student)
    reference = student.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(_hand(reference, teacher, "jsd", 0.7, 1.5).sum(), reference)
    torch.testing.assert_close(grad.double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_when_the_student_is_the_teacher(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(12, 8, generator=g), torch.randn(V, 8, generator=g)
    labels = torch.arange(12)
    loss = distillation_loss_sum(hidden, weight, hidden, weight, labels, kind, 0.5, 2.0, 5)
    assert abs(loss.item()) < 1e-5
    # Negative control: a different teacher gives a clearly positive divergence.
    other = distillation_loss_sum(hidden, weight, hidden * 2, weight, labels, kind, 0.5, 2.0, 5)
    assert other.item() > 1e-2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked_and_ignores_minus_100(kind: str) -> None:
    """Different widths for student and teacher, -100 rows excluded, chunk sizes that do and do
    not divide the row count: value and student gradients equal the full-logits reference."""
    g = torch.Generator().manual_seed(4)
    n, d_s, d_t = 23, 6, 10
    s_hidden = torch.randn(n, d_s, generator=g, requires_grad=True)
    s_weight = torch.randn(V, d_s, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, d_t, generator=g), torch.randn(V, d_t, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[[0, 5, 6, 20]] = -100
    keep = labels != -100
    reference = divergence_from_logits(
        (s_hidden @ s_weight.T)[keep], (t_hidden @ t_weight.T)[keep], kind, 0.4, 1.7
    ).sum()
    ref_grads = torch.autograd.grad(reference, (s_hidden, s_weight))
    for chunk_size in (1, 4, 7, 64):
        got = distillation_loss_sum(
            s_hidden, s_weight, t_hidden, t_weight, labels, kind, 0.4, 1.7, chunk_size
        )
        grads = torch.autograd.grad(got, (s_hidden, s_weight))
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-6)
        for mine, theirs in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)
    assert grads[0][~keep].abs().max() == 0  # ignored rows get no gradient
    # Changing the teacher at an ignored row changes nothing; at a target row it does.
    moved = t_hidden.clone()
    moved[5] += 10
    same = distillation_loss_sum(s_hidden, s_weight, moved, t_weight, labels, kind, 0.4, 1.7, 4)
    torch.testing.assert_close(same, reference, atol=1e-6, rtol=1e-6)
    moved[1] += 10
    changed = distillation_loss_sum(s_hidden, s_weight, moved, t_weight, labels, kind, 0.4, 1.7)
    assert abs(changed.item() - reference.item()) > 1e-3


def test_bad_arguments_are_refused() -> None:
    x, w = torch.randn(3, 4), torch.randn(V, 4)
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="jsd beta"):
        distillation_loss_sum(x, w, x, w, labels, "jsd", beta=1.0)
    with pytest.raises(ValueError, match="not one of"):
        distillation_loss_sum(x, w, x, w, labels, "kl")
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss_sum(x, w, x, torch.randn(V + 1, 4), labels)
