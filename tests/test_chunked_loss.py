"""The chunked cross-entropy equals the plain one in loss and gradients, without the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.batch import IGNORE_INDEX
from trainer.losses.cross_entropy import chunked_cross_entropy_sum, cross_entropy_sum


def _inputs(
    tokens: int, dim: int, vocab: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens // 2, dim, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) * 0.2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=generator)
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    labels[1, 7] = IGNORE_INDEX
    return hidden, weight, labels


def _loss_and_grads(
    loss_fn: object, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = loss_fn(hidden, weight, labels)  # type: ignore[operator]
    (loss * 0.37).backward()  # a non-unit upstream gradient (the 1 / global count)
    assert hidden.grad is not None and weight.grad is not None
    return loss.detach(), hidden.grad, weight.grad


def plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(F.linear(hidden, weight), labels)


@pytest.mark.parametrize(("vocab", "chunk"), [(1000, 64), (997, 48), (257, 1000)])
def test_chunked_loss_and_grads_equal_plain_fp32(vocab: int, chunk: int) -> None:
    hidden, weight, labels = _inputs(tokens=300, dim=32, vocab=vocab)

    def chunked(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy_sum(h, w, y, chunk_tokens=chunk)

    expected = _loss_and_grads(plain, hidden, weight, labels)
    got = _loss_and_grads(chunked, hidden, weight, labels)
    for name, want, have in zip(("loss", "grad hidden", "grad weight"), expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-6, msg=name)
    # Masked rows get no gradient at all.
    assert got[1][0, :5].abs().max() == 0 and got[1][1, -3:].abs().max() == 0


def test_chunked_loss_detects_a_wrong_label() -> None:
    """Negative control: one changed label moves the loss and the gradients beyond tolerance."""
    hidden, weight, labels = _inputs(tokens=128, dim=16, vocab=333)
    expected = _loss_and_grads(plain, hidden, weight, labels)
    wrong = labels.clone()
    wrong[0, 10] = (wrong[0, 10] + 1) % 333
    got = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy_sum(h, w, y, chunk_tokens=40), hidden, weight, wrong
    )
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=1e-6)


def test_chunked_loss_bf16_and_no_grad() -> None:
    """bf16 inputs: close to the plain bf16 path, gradients in bf16; under no_grad, the value only."""
    hidden, weight, labels = _inputs(tokens=64, dim=16, vocab=500, dtype=torch.bfloat16)
    expected = _loss_and_grads(plain, hidden, weight, labels)
    got = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy_sum(h, w, y, chunk_tokens=24), hidden, weight, labels
    )
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], expected[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2], expected[2], rtol=2e-2, atol=2e-3)
    with torch.no_grad():
        value = chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=24)
    assert not value.requires_grad
    torch.testing.assert_close(value, expected[0], rtol=1e-5, atol=1e-4)


def test_all_labels_ignored_gives_zero() -> None:
    hidden, weight, labels = _inputs(tokens=16, dim=8, vocab=50)
    loss, grad_hidden, grad_weight = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy_sum(h, w, y),
        hidden,
        weight,
        torch.full_like(labels, -100),
    )
    assert loss.item() == 0.0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


def test_transformer_hidden_states_path_matches_forward() -> None:
    """Through the model: chunked loss on hidden_states/output_weight equals the logits path."""
    from model import ModelConfig, build_model

    config = ModelConfig(
        vocab_size=301, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=32
    )
    tokens = torch.randint(0, 301, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    grads = []
    for use_chunked in (False, True):
        model = build_model(config, seed=3)
        if use_chunked:
            loss = chunked_cross_entropy_sum(
                model.hidden_states(inputs), model.output_weight, labels, chunk_tokens=7
            )
        else:
            loss = cross_entropy_sum(model(inputs), labels)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_chunk_tokens_must_be_positive() -> None:
    hidden, weight, labels = _inputs(tokens=32, dim=4, vocab=10)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=0)


def test_a_training_run_with_the_chunked_loss_equals_the_plain_one(tmp_path, corpus) -> None:  # type: ignore[no-untyped-def]
    """`train.loss_chunk_tokens` through the real loop: the same losses, eval losses and final
    weights as the plain logits path (fp32, 1e-6 relative; the summation order differs)."""
    from safetensors.torch import load_file

    from launch.environment import detect_environment
    from tests.helpers import read_metrics, small_config
    from trainer.config import job_config_from_dict
    from trainer.trainer import Trainer

    runs = {}
    for name, chunk in (("plain", 0), ("chunked", 24)):
        raw = small_config(tmp_path / name, corpus, train={"max_steps": 3, "eval_every": 3})
        raw["train"]["loss_chunk_tokens"] = chunk
        trainer = Trainer(job_config_from_dict(raw), detect_environment())
        trainer.setup()
        trainer.fit()
        train_lines, eval_lines = read_metrics(tmp_path / name)
        weights = load_file(tmp_path / name / "checkpoints" / "step_00000003" / "model.safetensors")
        runs[name] = (
            [r["loss"] for r in train_lines],
            [r["eval_loss"] for r in eval_lines],
            weights,
        )
    (plain_losses, plain_eval, plain_w), (chunk_losses, chunk_eval, chunk_w) = runs.values()
    torch.testing.assert_close(chunk_losses, plain_losses, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunk_eval, plain_eval, rtol=1e-6, atol=0)
    for key, value in plain_w.items():
        # Adam divides by sqrt(v): rounding noise in a tiny gradient moves a weight by ~lr x 1e-4.
        torch.testing.assert_close(chunk_w[key], value, rtol=1e-5, atol=1e-6)
