"""Reference log-prob cache: stored == live, keyed refusal, never a partial file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from data_pipeline.preference import (
    collate_pairs,
    parse_preference_record,
    tokenize_examples,
)
from data_pipeline.sources import SkipCounter
from model import build_model
from model.config import ModelConfig
from tests.test_preference_data import CHATML, TemplateRenderer, chat_tokenizer
from trainer import reference_cache as rc
from trainer.checkpoint import CheckpointError

RECORDS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome, I think."},
    {"prompt": "A joke?", "chosen": "Cats nap a lot.", "rejected": "No."},
    {"prompt": "Tell me about cats.", "chosen": "They nap.", "rejected": "What cats?"},
    {"prompt": "Is Paris the capital?", "chosen": "Yes, of France.", "rejected": "Maybe."},
]


@pytest.fixture(scope="module")
def setup() -> tuple[Any, ...]:
    tokenizer = chat_tokenizer()
    examples = [(f"r:{i}", parse_preference_record(r)) for i, r in enumerate(RECORDS)]
    pairs = tokenize_examples(
        examples, TemplateRenderer(tokenizer), 64, "error", SkipCounter(strict=True)
    )
    config = ModelConfig(
        vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1
    )
    reference = build_model(config, seed=11).eval()
    key = rc.ReferenceCacheKey(
        reference_sha256=rc.model_weights_sha256(reference),
        tokenizer_sha256=rc.text_sha256(tokenizer.backend_tokenizer.to_str()),
        chat_template_sha256=rc.text_sha256(CHATML),
        data_fingerprint=rc.text_sha256(repr(RECORDS)),
        truncation="error",
        seq_len=64,
        dtype="float32",
    )
    return reference, pairs, tokenizer.pad_token_id, key


def test_stored_equals_live_log_probs(setup: Any, tmp_path: Path) -> None:
    reference, pairs, pad_id, key = setup
    # Cached from batches of two pairs, read back for one batch of all four (other padding).
    batches = [collate_pairs(pairs[i : i + 2], pad_id) for i in (0, 2)]
    cache = rc.ReferenceCache(tmp_path)
    cache.save(key, *rc.compute_reference_logps(reference, batches, len(pairs)))
    loaded = cache.load(key)
    assert loaded is not None
    batch = rc.attach_reference_logps(collate_pairs(pairs[::-1], pad_id), *loaded)
    with torch.no_grad():
        live, _ = rc.batch_sequence_logps(reference, batch)
    torch.testing.assert_close(batch.extras[rc.REFERENCE_CHOSEN], live[:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.extras[rc.REFERENCE_REJECTED], live[4:], atol=1e-6, rtol=0)
    # Negative control: another model's log-probs are far from the stored ones.
    other = build_model(reference.config, seed=12).eval()
    with torch.no_grad():
        theirs, _ = rc.batch_sequence_logps(other, batch)
    assert (theirs[:4] - batch.extras[rc.REFERENCE_CHOSEN]).abs().max() > 1e-2


def test_a_different_reference_or_dataset_is_refused(setup: Any, tmp_path: Path) -> None:
    reference, pairs, _, key = setup
    cache = rc.ReferenceCache(tmp_path)
    cache.save(key, torch.zeros(len(pairs)), torch.zeros(len(pairs)))
    changed = build_model(reference.config, seed=11)
    assert rc.model_weights_sha256(changed) == key.reference_sha256
    with torch.no_grad():
        changed.norm.weight[3] += 1e-3
    new_reference = dataclasses.replace(key, reference_sha256=rc.model_weights_sha256(changed))
    assert new_reference.reference_sha256 != key.reference_sha256
    for other, field in (
        (new_reference, "reference_sha256"),
        (dataclasses.replace(key, data_fingerprint="0" * 64), "data_fingerprint"),
        (dataclasses.replace(key, seq_len=128), "seq_len"),
        (dataclasses.replace(key, truncation="drop"), "truncation"),
    ):
        with pytest.raises(
            CheckpointError, match=rf"^{tmp_path}/\S+: made for a different {field} "
        ) as info:
            cache.load(other)
        assert "\n" not in str(info.value)
    assert cache.load(key) is not None


def test_a_partially_written_cache_is_never_used(
    setup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, pairs, _, key = setup
    cache = rc.ReferenceCache(tmp_path)

    def crash(*args: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(rc.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        cache.save(key, torch.zeros(len(pairs)), torch.zeros(len(pairs)))
    monkeypatch.undo()
    assert any(tmp_path.iterdir())  # the temporary file is there ...
    assert cache.load(key) is None  # ... and invisible
    # A damaged file in place (not something save() writes) is refused, not half-read.
    cache.save(key, torch.ones(len(pairs)), torch.ones(len(pairs)))
    data = cache.path.read_bytes()
    cache.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable reference cache"):
        cache.load(key)
