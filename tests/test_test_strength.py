"""Checks that the mutation audit (tests/mutants.yaml) found missing or too weak elsewhere.

Each test compares against a reference computed independently of the code under test and
carries a negative control showing that the comparison can fail:

- cached decoding with a sliding window equals, position by position, a plain causal forward
  over just the window (one layer, relative RoPE): no shared masking code to hide a bug;
- RNG states captured for a checkpoint replay the same draws of Python, NumPy and torch after
  a save, a weights-only load and a restore;
- a checkpoint file changed in place (same size) fails the manifest's SHA-256 check;
- the reference log-prob cache refuses a key that differs in any one of its fields.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelConfig, build_model
from model.kv_cache import KVCache
from trainer import reference_cache as rc
from trainer.checkpointing import checkpoint as ckpt

WINDOW = 4


def one_layer(sliding_window: int | None) -> ModelConfig:
    return ModelConfig(
        vocab_size=97,
        dim=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=32,
        sliding_window=sliding_window,
        init_std=0.1,  # attention far from uniform, so a key seen or not seen shows
    )


def cached_decode_logits(model: torch.nn.Module, tokens: list[int], prompt: int) -> torch.Tensor:
    """Logits (T, vocab) of every position: the prompt in one forward, then one token a step."""
    config = model.config  # type: ignore[attr-defined]
    cache = KVCache(1, 1, config.kv_heads, len(tokens), config.head_dim, torch.float32, "cpu")
    with torch.no_grad():
        rows = [model(torch.tensor([tokens[:prompt]]), kv_cache=cache, start_pos=0)[0]]
        for position in range(prompt, len(tokens)):
            step = torch.tensor([[tokens[position]]])
            rows.append(model(step, kv_cache=cache, start_pos=position)[0])
    return torch.cat(rows)


def test_cached_decoding_respects_the_sliding_window() -> None:
    """With one layer, position i sees exactly tokens i-W+1..i; RoPE is relative, so its logits
    equal the last logits of a plain causal forward over those W tokens alone. The reference
    model has no window at all (it never needs one: its inputs are at most W long)."""
    windowed = build_model(one_layer(WINDOW), seed=4).eval()
    plain = build_model(one_layer(None), seed=0).eval()
    plain.load_state_dict(windowed.state_dict())
    tokens = torch.randint(0, 97, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    cached = cached_decode_logits(windowed, tokens, prompt=3)
    with torch.no_grad():
        reference = torch.stack(
            [
                plain(torch.tensor([tokens[max(0, i - WINDOW + 1) : i + 1]]))[0, -1]
                for i in range(len(tokens))
            ]
        )
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)
    # The full windowed forward agrees too (the training path).
    with torch.no_grad():
        full = windowed(torch.tensor([tokens]))[0]
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    # Negative control: without the window, decoding past it sees older keys and differs.
    unwindowed = cached_decode_logits(plain, tokens, prompt=3)
    torch.testing.assert_close(unwindowed[:WINDOW], reference[:WINDOW], atol=1e-5, rtol=1e-5)
    gaps = (unwindowed[WINDOW:] - reference[WINDOW:]).abs().amax(dim=-1)
    assert bool((gaps > 1e-3).all()), gaps


def draws() -> tuple[list[float], list[float], list[float]]:
    """A few numbers from each global RNG a training step may use (dropout, shuffles)."""
    python = [random.random() for _ in range(3)]
    numpy = [float(v) for v in np.random.standard_normal(3)]  # odd count: a cached gaussian
    torch_values = torch.rand(3).tolist()
    return python, numpy, torch_values


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    draws()  # leave NumPy with a cached gaussian, the part of its state easiest to lose
    torch.save(ckpt.capture_rng_state(), tmp_path / "rng.pt")
    expected = draws()
    moved_on = draws()
    # Negative control: without a restore the next draws are new numbers in every generator.
    for before, after in zip(expected, moved_on, strict=True):
        assert before != after
    ckpt.restore_rng_state(ckpt.safe_torch_load(tmp_path / "rng.pt"))
    assert draws() == expected


def test_a_file_changed_in_place_fails_the_sha256_check(tmp_path: Path) -> None:
    folder = tmp_path / "step_00000001"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (folder / "trainer_state.json").write_text('{"step": 1}')
    ckpt.write_manifest(folder, {"step": 1})
    assert ckpt.verify_checkpoint(folder)["step"] == 1  # intact: accepted
    data = bytearray((folder / "model" / "weights.bin").read_bytes())
    data[1000] ^= 1  # one bit, same size: only the hash can tell
    (folder / "model" / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"weights\.bin: SHA-256 does not match"):
        ckpt.verify_checkpoint(folder)


KEY = rc.ReferenceCacheKey(
    reference_sha256="a" * 64,
    tokenizer_sha256="b" * 64,
    chat_template_sha256="c" * 64,
    data_fingerprint="d" * 64,
    truncation="error",
    seq_len=64,
    dtype="float32",
)


def changed(value: object) -> object:
    return value * 2 if isinstance(value, int) else f"{value}-changed"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(rc.ReferenceCacheKey)])
def test_the_reference_cache_refuses_a_key_that_differs_in_any_field(
    field: str, tmp_path: Path
) -> None:
    cache = rc.ReferenceCache(tmp_path)
    cache.save(KEY, torch.zeros(3), torch.ones(3))
    loaded = cache.load(KEY)  # control: the same key is accepted
    assert loaded is not None and loaded[1].tolist() == [1.0, 1.0, 1.0]
    other = dataclasses.replace(KEY, **{field: changed(getattr(KEY, field))})
    with pytest.raises(ckpt.CheckpointError, match=rf": made for a different {field} "):
        cache.load(other)


def test_a_packed_document_sees_only_itself_through_the_training_forward() -> None:
    """The pretraining path with `data.document_masking` (the loader's `causal_lm_batch`, then
    the objective's forward with the batch's doc ids): the second packed document's logits
    equal that document's logits alone, and its loss is its loss alone. Negative control: the
    same packed row without document ids differs."""
    from data_pipeline.batch import causal_lm_batch
    from trainer.objectives.causal_lm import CausalLMObjective

    eos = 2
    config = ModelConfig(
        vocab_size=97,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        reset_positions_per_document=True,
    )
    model = build_model(config, seed=0).eval()
    rng = torch.Generator().manual_seed(0)
    first = [*torch.randint(3, 97, (9,), generator=rng).tolist(), eos]
    second = [*torch.randint(3, 97, (12,), generator=rng).tolist(), eos]
    packed = torch.tensor([first + second + [5]])  # T + 1 tokens: inputs and next-token labels
    batch = causal_lm_batch(packed, eos_id=eos, document_masking=True)
    with torch.no_grad():
        logits = model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
        alone = model(torch.tensor([second]))
        unmasked = model(batch.input_ids)
    start = len(first)
    torch.testing.assert_close(logits[0, start:], alone[0], rtol=1e-5, atol=1e-5)
    assert (unmasked[0, start:] - alone[0]).abs().max() > 1e-2  # the control can fail
    # The objective's loss over the second document alone equals its standalone loss.
    objective = CausalLMObjective(seq_len=packed.shape[1] - 1)
    labels = batch.labels.clone()
    labels[0, :start] = -100  # keep the targets predicted inside the second document...
    labels[0, -1] = -100  # ...and not the token after its EOS
    only_second = dataclasses.replace(batch, labels=labels)
    with torch.no_grad():
        packed_loss = objective.loss_sum(model, only_second)
        standalone = model(torch.tensor([second[:-1]]))
        reference = torch.nn.functional.cross_entropy(
            standalone[0], torch.tensor(second[1:]), reduction="sum"
        )
    torch.testing.assert_close(packed_loss, reference, rtol=1e-5, atol=1e-5)
