"""Reward model: scores at the last real token, HF export parity, and that it can learn."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import build_model  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.hf.reward_export import save_reward_model_as_hf  # noqa: E402
from model.reward import RewardModel, last_token_index  # noqa: E402
from trainer.losses.preference import bradley_terry_losses  # noqa: E402

VOCAB, PAD = 96, 0


def reward_model(seed: int = 0, **overrides: Any) -> RewardModel:
    config = ModelConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        init_std=0.1,  # attention far from uniform: a masking mistake shows
        **overrides,
    )
    model = RewardModel(build_model(config, seed=seed))
    torch.manual_seed(seed)
    model.init_score()
    return model.eval()


def ragged(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), PAD)
    mask = torch.ones(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        tokens[i, span], mask[i, span] = row, False
    return tokens, mask


def test_last_token_index_either_side() -> None:
    mask = torch.tensor([[False, False, True, True], [True, False, False, False]])
    assert last_token_index(mask).tolist() == [1, 3]


def test_padding_side_does_not_change_scores() -> None:
    model = reward_model()
    rows = ragged([5, 12, 9])
    with torch.no_grad():
        alone = torch.cat([model(row[None]) for row in rows])
        right = model(*pad(rows, "right"))
        left = model(*pad(rows, "left"))
        # Negative control: without the pad mask a left-padded row reads the pads.
        unmasked = model(pad(rows, "left")[0])
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    assert (unmasked - alone).abs().max() > 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_hf_export_scores_match(tied: bool, tmp_path: Path) -> None:
    model = reward_model(seed=2, tie_embeddings=tied)
    name = save_reward_model_as_hf(model, tmp_path / "rm", pad_token_id=PAD)
    assert name == "LlamaForSequenceClassification"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == name and hf.config.num_labels == 1
    assert (
        "lm_head.weight"
        not in json.loads((tmp_path / "rm" / "model.safetensors.index.json").read_text())[
            "weight_map"
        ]
    )
    rows = ragged([7, 15, 11], seed=3)
    tokens, mask = pad(rows, "right")
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=(~mask).long()).logits.squeeze(-1)
        ours = model(tokens, mask)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # Negative control: another head gives other scores.
    with torch.no_grad():
        model.score.weight.mul_(-1)
        assert (model(tokens, mask) - theirs).abs().max() > 1e-3


def test_sharded_export_loads(tmp_path: Path) -> None:
    model = reward_model(seed=4)
    save_reward_model_as_hf(model, tmp_path / "rm", pad_token_id=PAD, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "rm" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(
        p.name for p in (tmp_path / "rm").glob("*.safetensors")
    )
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tokens = ragged([10], seed=5)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=tokens).logits.squeeze(-1), model(tokens), atol=1e-5, rtol=1e-5
        )


def preference_set(
    n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of random sequences where the chosen one contains the marker token 1 somewhere
    and the rejected one does not (same prompt, different lengths so padding matters)."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for _ in range(n):
        prompt = torch.randint(
            2, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g
        )
        good = torch.randint(2, VOCAB, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
        good[int(torch.randint(0, len(good), (1,), generator=g))] = 1
        bad = torch.randint(2, VOCAB, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
        chosen.append(torch.cat([prompt, good]))
        rejected.append(torch.cat([prompt, bad]))
    tokens, mask = pad(chosen + rejected, "right")
    return tokens[:n], mask[:n], tokens[n:], mask[n:]


def test_a_tiny_reward_model_learns_a_marker_preference() -> None:
    """Fresh pairs every step (so it cannot memorise), then accuracy on pairs never seen."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, max_seq_len=64)
    model = RewardModel(build_model(dataclasses.replace(config, init_std=0.1), seed=5))
    model.init_score()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        tc, mc, tr, mr = preference_set(16, seed=100 + step)
        scores = model(torch.cat([tc, tr]), torch.cat([mc, mr]))
        loss = bradley_terry_losses(scores[:16], scores[16:], center_coef=0.01).losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        tc, mc, tr, mr = preference_set(64, seed=7)
        out = bradley_terry_losses(model(tc, mc), model(tr, mr))
    accuracy = out.metrics()["reward_accuracy"].mean().item()
    assert accuracy > 0.9, accuracy


def test_reward_checkpoint_exports_with_its_tokenizer(tmp_path: Path) -> None:
    """A checkpoint (imported from HF, then given a reward head) exports as
    Qwen2ForSequenceClassification; AutoTokenizer + the model score our texts as we do."""
    from safetensors.torch import load_file, save_file

    from tests.test_hf_tokenizer import save_hf_folder
    from trainer import checkpoint as ckpt
    from trainer.hf_checkpoint import import_hf
    from trainer.hf_reward import export_reward_checkpoint, load_reward_checkpoint

    save_hf_folder("qwen2", tmp_path / "hf")
    folder = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    state = {f"backbone.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    state["score.weight"] = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    save_file(state, folder / "model.safetensors", {"format": "pt"})
    ckpt.write_manifest(folder, {"step": 0})
    export_reward_checkpoint(folder, tmp_path / "export")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "export", attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    texts = ["def compute_value(items):\n    return items + 1\n", "x = 1"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    ours = load_reward_checkpoint(folder)
    assert encoded["input_ids"][0].tolist() == ours.tokenizer.encode(texts[0])
    with torch.no_grad():
        theirs = hf(**encoded).logits.squeeze(-1)
        mine = ours.model(encoded["input_ids"], encoded["attention_mask"] == 0)
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
    assert (theirs[0] - theirs[1]).abs() > 1e-3  # the rows are really scored apart
