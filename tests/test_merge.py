"""`scaletrain merge`: each method against a hand computation, identities, a two-task merge,
HF export parity, streaming memory, and one-line refusals of inputs that do not match."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from launch.cli import main
from model import build_model
from model.config import ModelConfig
from tests.helpers import synthetic_document
from trainer.checkpointing import checkpoint as ckpt
from trainer.config import JobConfig, write_config
from trainer.inference import load_checkpoint_model
from trainer.merging import (
    MergeRecipe,
    StreamingSafetensorsWriter,
    dare,
    dare_seed,
    linear,
    merge_tensor,
    run_merge,
    slerp,
    task_arithmetic,
    ties,
    trim,
)

VOCAB = 320
SMALL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Small tensors: one thread is faster than two fighting over a busy machine (20x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    return train_tokenizer([synthetic_document(rng) for _ in range(200)], VOCAB)


def model_config(**changes: Any) -> ModelConfig:
    return ModelConfig(**{"vocab_size": VOCAB, **SMALL, **changes})


def random_state(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(config, "cpu")
    model.init_weights()
    with torch.no_grad():  # norms start at 1: move them so that they are merged visibly
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_checkpoint(
    folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer
) -> Path:
    """A checkpoint folder as `load_checkpoint_model` reads it (weights, config, tokenizer)."""
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", {"format": "pt"})
    job = JobConfig()
    job.model = config
    job.data.seq_len = 32
    job.train.global_batch_tokens = 64
    write_config(job, folder / "config.yaml")
    tokenizer.save(folder)
    ckpt.write_manifest(folder, {"step": 0})
    return folder


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------- tensor math
def test_each_method_equals_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g)
    a, b, c = (base + torch.randn(3, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(
        linear([a, b, c], [1.0, 2.0, 5.0]), ((a + 2 * b + 5 * c) / 8).double()
    )
    torch.testing.assert_close(
        task_arithmetic(base, [a - base, b - base], [0.5, -0.25]),
        (base + 0.5 * (a - base) - 0.25 * (b - base)).double(),
    )
    # TIES, one entry at a time in plain Python.
    deltas = [a - base, b - base, c - base]
    weights, density = [1.0, 0.5, 2.0], 0.5
    k = round(density * 12)
    trimmed = []
    for d in deltas:
        flat = d.flatten().tolist()
        threshold = sorted((abs(x) for x in flat), reverse=True)[k - 1]
        trimmed.append([x if abs(x) >= threshold else 0.0 for x in flat])
    expected = []
    for j in range(12):
        values = [w * t[j] for w, t in zip(weights, trimmed, strict=True)]
        sign = math.copysign(1.0, sum(values)) if sum(values) != 0 else 0.0
        agree = [v for v in values if v != 0 and math.copysign(1.0, v) == sign]
        expected.append(base.flatten()[j].item() + (sum(agree) / len(agree) if agree else 0.0))
    got = ties(base, deltas, weights, density)
    torch.testing.assert_close(got.flatten(), torch.tensor(expected, dtype=torch.float64))
    # SLERP between orthogonal unit vectors: (cos(t pi/2), sin(t pi/2)).
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for t in (0.25, 1 / 3, 0.5):
        expected_slerp = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)])
        torch.testing.assert_close(slerp(x, y, t), expected_slerp.double())
    # ... and with norms 2 and 3 at 60 degrees: sin((1-t)th)/sin(th) x + sin(t th)/sin(th) y.
    x, y = torch.tensor([2.0, 0.0]), 3 * torch.tensor([0.5, math.sqrt(3) / 2])
    th = math.pi / 3
    expected_slerp = (math.sin(0.7 * th) * x + math.sin(0.3 * th) * y) / math.sin(th)
    torch.testing.assert_close(slerp(x, y, 0.3), expected_slerp.double())


def test_dare_drops_rescales_and_is_seeded_per_tensor_name() -> None:
    delta = torch.randn(200, 50, generator=torch.Generator().manual_seed(1))
    dropped = dare(delta, 0.75, seed=5)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], (delta[kept] / 0.25).double())
    assert abs(kept.float().mean().item() - 0.25) < 0.02  # 10,000 entries: +-0.0043 std
    torch.testing.assert_close(dare(delta, 0.75, seed=5), dropped)  # deterministic
    assert dare_seed(0, "layers.0.attention.q_proj.weight", 0) == dare_seed(
        0, "layers.0.attention.q_proj.weight", 0
    )
    other = {
        dare_seed(0, "layers.0.attention.q_proj.weight", 1),
        dare_seed(0, "layers.1.attention.q_proj.weight", 0),
        dare_seed(1, "layers.0.attention.q_proj.weight", 0),
    }
    assert dare_seed(0, "layers.0.attention.q_proj.weight", 0) not in other and len(other) == 3


def test_identities() -> None:
    g = torch.Generator().manual_seed(2)
    base, a, b = (torch.randn(4, 6, generator=g) for _ in range(3))
    # A model merged with itself is itself, bit for bit, even with uneven weights.
    assert torch.equal(linear([a, a, a], [0.3, 0.7, 0.1]).float(), a)
    recipe = MergeRecipe("task_arithmetic", ["x", "y"], "out", weights=[0.0, 0.0], base="b")
    assert torch.equal(merge_tensor(recipe, "w", [a, b], base).float(), base)
    dare_recipe = dataclasses.replace(recipe, method="dare", drop_prob=0.0, weights=[0.6, 0.3])
    ta_recipe = dataclasses.replace(recipe, weights=[0.6, 0.3])
    assert torch.equal(
        merge_tensor(dare_recipe, "w", [a, b], base), merge_tensor(ta_recipe, "w", [a, b], base)
    )
    # TIES of task vectors with disjoint supports is their sum (any density keeping them whole).
    mask = torch.rand(4, 6, generator=g) > 0.5
    delta_a, delta_b = torch.where(mask, a, 0.0), torch.where(~mask, b, 0.0)
    torch.testing.assert_close(
        ties(base, [delta_a, delta_b], [1.0, 1.0], 1.0), (base + delta_a + delta_b).double()
    )
    assert torch.equal(slerp(a, b, 0.0).float(), a)
    assert torch.equal(slerp(a, b, 1.0).float(), b)
    # Colinear tensors fall back to linear interpolation (no division by sin(0)).
    torch.testing.assert_close(slerp(a, 2 * a, 0.25), (1.25 * a).double())


def test_moe_experts_are_trimmed_and_interpolated_one_by_one() -> None:
    g = torch.Generator().manual_seed(3)
    experts = torch.randn(4, 5, 6, generator=g)
    experts[0] *= 100  # one loud expert must not take the whole budget
    kept = trim(experts, 0.2, groups=4)
    assert [int((kept[e] != 0).sum()) for e in range(4)] == [6, 6, 6, 6]
    for e in range(4):
        torch.testing.assert_close(kept[e], trim(experts[e], 0.2))
    other = torch.randn(4, 5, 6, generator=g)
    stacked = slerp(experts, other, 0.4, groups=4)
    for e in range(4):
        torch.testing.assert_close(stacked[e], slerp(experts[e], other[e], 0.4))


def test_streaming_writer_is_read_by_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b.bf16": torch.randn(7).bfloat16(),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.odd": torch.randn(1, 1, 3).half(),
    }
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


# ---------------------------------------------------------------------------- end to end
def test_merge_checkpoints_identities_and_pattern_weights(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = model_config()
    states = [random_state(config, seed) for seed in range(3)]
    a, b, base = (
        write_checkpoint(tmp_path / n, config, s, tokenizer)
        for n, s in zip("abz", states, strict=True)
    )
    code, out, err = cli(
        capsys, "merge", "--method", "linear", "--models", a, a, "--weights", "0.3", "0.7",
        "--out", tmp_path / "self",
    )  # fmt: skip
    assert code == 0, err
    merged = load_file(tmp_path / "self" / "model.safetensors")
    assert all(torch.equal(merged[k], states[0][k]) for k in states[0])
    ckpt.verify_checkpoint(tmp_path / "self")
    code, _, err = cli(
        capsys, "merge", "--method", "task_arithmetic", "--models", a, b, "--base", base,
        "--weights", "0", "0", "--out", tmp_path / "lambda0",
    )  # fmt: skip
    assert code == 0, err
    merged = load_file(tmp_path / "lambda0" / "model.safetensors")
    assert all(torch.equal(merged[k], states[2][k]) for k in states[2])
    # A recipe with per-pattern weights: attention from a only, everything else from b only.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            method: linear
            models: [{a}, {b}]
            weights: [0.0, 1.0]
            tensors:
              - pattern: "layers.*.attention.*"
                weights: [1.0, 0.0]
            """
        )
    )
    code, _, err = cli(capsys, "merge", recipe, "--out", tmp_path / "pattern")
    assert code == 0, err
    merged = load_file(tmp_path / "pattern" / "model.safetensors")
    attention = [k for k in merged if ".attention." in k]
    assert attention and all(torch.equal(merged[k], states[0][k]) for k in attention)
    assert all(torch.equal(merged[k], states[1][k]) for k in merged if k not in attention)
    # The output is a complete checkpoint: generate loads it.
    code, out, err = cli(
        capsys, "generate", tmp_path / "pattern", "--prompt", "def ", "--max-new-tokens", "3"
    )
    assert code == 0 and out.startswith("def "), err


def test_tied_embeddings_keep_the_invariant(tmp_path: Path, tokenizer: Tokenizer) -> None:
    config = model_config(tie_embeddings=True)
    states = [random_state(config, seed) for seed in (4, 5)]
    assert "output.weight" not in states[0]
    a, b = (
        write_checkpoint(tmp_path / n, config, s, tokenizer)
        for n, s in zip("ab", states, strict=True)
    )
    out = run_merge(MergeRecipe("slerp", [str(a), str(b)], str(tmp_path / "m"), t=0.3))
    loaded = load_checkpoint_model(out)
    assert loaded.model.output is None
    expected = slerp(states[0]["tok_embeddings.weight"], states[1]["tok_embeddings.weight"], 0.3)
    torch.testing.assert_close(loaded.model.output_weight, expected.float())


@pytest.mark.parametrize("kind", ["shape", "name", "vocab", "architecture", "tied"])
def test_mismatched_inputs_are_refused_in_one_line(
    kind: str, tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = model_config()
    a = write_checkpoint(tmp_path / "a", config, random_state(config, 0), tokenizer)
    state = random_state(config, 1)
    other_config, other_tokenizer = config, tokenizer
    if kind == "shape":  # same config, one tensor of another shape (a damaged or edited file)
        state["layers.1.ffn_norm.weight"] = torch.ones(33)
    elif kind == "name":
        state["layers.1.ffn_norm.weight_renamed"] = state.pop("layers.1.ffn_norm.weight")
    elif kind == "vocab":
        rng = random.Random(9)
        other_tokenizer = train_tokenizer([synthetic_document(rng) for _ in range(200)], VOCAB)
    elif kind == "architecture":
        other_config = model_config(dim=64)
        state = random_state(other_config, 1)
    else:
        other_config = model_config(tie_embeddings=True)
        state = random_state(other_config, 1)
    b = write_checkpoint(tmp_path / "b", other_config, state, other_tokenizer)
    code, _, err = cli(
        capsys, "merge", "--method", "linear", "--models", a, b, "--out", tmp_path / "m"
    )
    expected = {
        "shape": "shapes differ: layers.1.ffn_norm.weight is [32]",
        "name": "tensor names differ: 'layers.1.ffn_norm.weight' missing in",
        "vocab": "tokenizers differ: id ",
        "architecture": "architectures differ: model.dim is 32 in",
        "tied": "architectures differ: model.tie_embeddings is False in",
    }[kind]
    assert code == 2
    assert err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def test_bad_options_are_refused_in_one_line(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = model_config()
    a = write_checkpoint(tmp_path / "a", config, random_state(config, 0), tokenizer)
    cases: list[tuple[list[object], str]] = [
        (["--method", "ties", "--models", a, a], "base: ties needs --base"),
        (["--method", "slerp", "--models", a, a, a], "slerp takes exactly 2 models"),
        (["--method", "linear", "--models", a, a, "--weights", "1"], "1 weights for 2 models"),
        (["--method", "dare", "--models", a, "--base", a, "--drop-prob", "1"], "drop_prob"),
        (["--method", "linear", "--models", a, tmp_path / "nope"], "no complete checkpoint"),
        (["--method", "dare", "--models", a, "--base", a, "--density", "0.5"], "part of ties"),
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nmodels: [{a}, {a}]\nwieghts: [1, 2]\n")
    cases.append(([recipe], "unknown key 'wieghts'"))
    cases.append(([recipe, "--method", "ties"], "--method given with"))
    for argv, message in cases:
        code, _, err = cli(capsys, "merge", *argv, "--out", tmp_path / "m")
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    code, _, err = cli(
        capsys, "merge", "--method", "linear", "--models", a, a, "--out", tmp_path / "full"
    )
    assert code == 2 and "exists and is not empty" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"


# ---------------------------------------------------------------------------- two tasks
def _task_batch(task: str, n: int, seed: int) -> torch.Tensor:
    """Sequences of a deterministic rule: task A counts up by 1 in [10, 60), task B counts
    down by 3 in [100, 250); each needs its own fine-tune to be predicted."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 1000, (n, 1), generator=g)
    steps = torch.arange(24)
    if task == "a":
        return 10 + (start + steps) % 50
    return 100 + (start - 3 * steps) % 150


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def _fine_tune(config: ModelConfig, base: dict[str, torch.Tensor], task: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    model.load_state_dict(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(40):
        loss = _loss(model, _task_batch(task, 16, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_merged_fine_tunes_keep_both_tasks(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = model_config()
    base_state = random_state(config, 0)
    base = write_checkpoint(tmp_path / "base", config, base_state, tokenizer)
    tuned = {t: _fine_tune(config, base_state, t) for t in "ab"}
    ckpts = {t: write_checkpoint(tmp_path / t, config, s, tokenizer) for t, s in tuned.items()}
    code, _, err = cli(
        capsys, "merge", "--method", "ties", "--models", ckpts["a"], ckpts["b"], "--base", base,
        "--density", "0.7", "--out", tmp_path / "merged",
    )  # fmt: skip
    assert code == 0, err
    eval_batches = {t: _task_batch(t, 32, 10_000) for t in "ab"}
    losses = {}
    with torch.no_grad():
        for name in ("base", "a", "b", "merged"):
            model = load_checkpoint_model(tmp_path / name).model
            losses[name] = {t: round(_loss(model, eval_batches[t]).item(), 4) for t in "ab"}
    print(json.dumps(losses))
    # Each fine-tune learned its task and not the other; the merge beats each fine-tune on
    # the task that fine-tune did not see.
    assert losses["a"]["a"] < 0.5 * losses["b"]["a"] and losses["b"]["b"] < 0.5 * losses["a"]["b"]
    assert losses["merged"]["a"] < losses["b"]["a"]
    assert losses["merged"]["b"] < losses["a"]["b"]


def test_hf_inputs_and_hf_output_match_transformers(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    """hf:DIR inputs merge to the same weights as the checkpoints they came from, and the
    --format hf output loads in transformers with our logits."""
    transformers = pytest.importorskip("transformers")
    from model.hf import save_model_as_hf

    config = model_config()
    names = ("a", "b", "base")
    states = {n: random_state(config, seed) for seed, n in enumerate(names)}
    ckpts = {n: write_checkpoint(tmp_path / n, config, states[n], tokenizer) for n in names}
    for n in names:
        model = build_model(config, "meta")
        model.load_state_dict(states[n], assign=True)
        save_model_as_hf(model, tmp_path / f"hf-{n}")
        tokenizer.save(tmp_path / f"hf-{n}")
    options = ["--method", "ties", "--density", "0.6", "--drop-prob", "0.3", "--seed", "4"]
    code, _, err = cli(
        capsys, "merge", *options, "--models", ckpts["a"], ckpts["b"], "--base", ckpts["base"],
        "--out", tmp_path / "merged",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = cli(
        capsys, "merge", *options, "--models", f"hf:{tmp_path / 'hf-a'}",
        f"hf:{tmp_path / 'hf-b'}", "--base", f"hf:{tmp_path / 'hf-base'}",
        "--format", "hf", "--out", tmp_path / "merged-hf",
    )  # fmt: skip
    assert code == 0, err
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged-hf").eval()
    ours = load_checkpoint_model(tmp_path / "merged").model
    batch = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = theirs(batch).logits, ours(batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Negative control: the merge moved the logits far from every input's.
    for n in names:
        with torch.no_grad():
            assert (load_checkpoint_model(ckpts[n]).model(batch) - got).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_moe_hf_inputs_are_stacked_like_our_checkpoints(
    arch: str, tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """Per-expert HF tensors are read back into our stacked (E, ...) experts: merging hf:DIR
    folders gives bit-identical weights to merging the checkpoints they were written from."""
    from model.hf import save_model_as_hf

    moe = {"n_experts": 4, "top_k": 2, "moe_ffn_hidden_dim": 16}
    if arch.startswith("Qwen3"):
        moe["qk_norm"] = True
    config = model_config(**moe)
    states = [random_state(config, seed) for seed in (0, 1)]
    assert states[0]["layers.0.feed_forward.experts.gate_proj"].shape[0] == 4
    ckpts, folders = [], []
    for i, state in enumerate(states):
        ckpts.append(str(write_checkpoint(tmp_path / f"c{i}", config, state, tokenizer)))
        model = build_model(config, "meta")
        model.load_state_dict(state, assign=True)
        save_model_as_hf(model, tmp_path / f"hf{i}", architecture=arch)
        tokenizer.save(tmp_path / f"hf{i}")
        folders.append(f"hf:{tmp_path / f'hf{i}'}")
    run_merge(MergeRecipe("slerp", ckpts, str(tmp_path / "from-ckpt"), t=0.3))
    run_merge(MergeRecipe("slerp", folders, str(tmp_path / "from-hf"), t=0.3))
    expected = load_file(tmp_path / "from-ckpt" / "model.safetensors")
    got = load_file(tmp_path / "from-hf" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    name = "layers.1.feed_forward.experts.down_proj"
    a, b = states[0][name], states[1][name]
    for e in range(4):  # expert by expert: each its own sphere
        torch.testing.assert_close(got[name][e], slerp(a[e], b[e], 0.3).float())


def test_run_dirs_resolve_and_lora_checkpoints_are_refused(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = model_config()
    state = random_state(config, 0)
    run = tmp_path / "run"
    step = write_checkpoint(run / "checkpoints" / "step_00000004", config, state, tokenizer)
    (run / "checkpoints" / "latest").write_text(step.name + "\n")
    code, _, err = cli(
        capsys, "merge", "--method", "linear", "--models", run, step, "--out", tmp_path / "m"
    )
    assert code == 0, err
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.equal(merged[k], state[k]) for k in state)
    lora = dict(state, **{"layers.0.attention.q_proj.lora_A": torch.zeros(2, 32)})
    adapter = write_checkpoint(tmp_path / "lora", config, lora, tokenizer)
    code, _, err = cli(
        capsys, "merge", "--method", "linear", "--models", step, adapter, "--out", tmp_path / "x"
    )
    assert code == 2 and err.count("\n") == 1 and "LoRA adapter tensors" in err, err


# ---------------------------------------------------------------------------- memory
_MEMORY_SCRIPT = """
import json, re, sys
from safetensors.torch import load_file
from trainer.merging import MergeRecipe, run_merge
import trainer.inference  # imported before the baseline: modules are not the merge's memory

def status_kib(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

models, out = sys.argv[1].split(","), sys.argv[2]
growth = {}
for mode in ("streaming", "all_at_once"):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    if mode == "all_at_once":  # negative control: every input in memory together, touched
        held = [load_file(m + "/model.safetensors") for m in models]
        print(sum(float(t.sum()) for state in held for t in state.values()), file=sys.stderr)
    run_merge(MergeRecipe("linear", models, out + "/" + mode))
    growth[mode] = (status_kib("VmHWM") - before) * 1024
    held = []
print(json.dumps(growth))
"""


def test_merge_streams_tensor_by_tensor(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """4 inputs of 40 MB: the merge's peak RSS growth stays far below their 160 MB sum, while
    holding the inputs at once (the negative control) grows by at least the sum."""
    config = model_config(dim=256, n_layers=15, n_heads=4, n_kv_heads=4, ffn_hidden_dim=512)
    shapes = {k: v.shape for k, v in build_model(config, "meta").state_dict().items()}
    models = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        models.append(str(write_checkpoint(tmp_path / f"m{i}", config, state, tokenizer)))
        del state
    input_bytes = sum((Path(m) / "model.safetensors").stat().st_size for m in models)
    largest = max(math.prod(s) for s in shapes.values()) * 4
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, ",".join(models), tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    growth = json.loads(result.stdout.splitlines()[-1])
    print(
        f"inputs {input_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB, growth {growth}"
    )
    assert input_bytes > 150 * 2**20
    assert growth["streaming"] < 0.25 * input_bytes
    assert growth["all_at_once"] > 0.9 * input_bytes
    merged = load_file(tmp_path / "streaming" / "model.safetensors")
    assert merged.keys() == shapes.keys()


def test_a_lora_checkpoint_merges_with_its_adapters_folded_in(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A LoRA run's checkpoint (adapters beside frozen base weights, a `lora` section in its
    config.yaml) enters a merge as base + scaling x B @ A; a linear merge of it with itself
    gives exactly that folded network, and a wrong scaling would not."""
    import yaml

    config = model_config()
    state = random_state(config, 0)
    g = torch.Generator().manual_seed(1)
    q = "layers.0.attention.q_proj"
    out_dim, in_dim = state[f"{q}.weight"].shape
    lora_a, lora_b = torch.randn(4, in_dim, generator=g), torch.randn(out_dim, 4, generator=g)
    adapted = dict(state, **{f"{q}.lora_A": lora_a, f"{q}.lora_B": lora_b})
    folder = write_checkpoint(tmp_path / "lora", config, adapted, tokenizer)
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["lora"] = {"rank": 4, "alpha": 8.0, "targets": ["q_proj"]}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ckpt.write_manifest(folder, {"step": 0})  # the manifest covers the edited config
    code, _, err = cli(
        capsys, "merge", "--method", "linear", "--models", folder, folder, "--out", tmp_path / "m"
    )
    assert code == 0, err
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert not any("lora_" in name for name in merged)
    expected = state[f"{q}.weight"] + (8.0 / 4) * (lora_b @ lora_a)
    torch.testing.assert_close(merged[f"{q}.weight"], expected, rtol=1e-5, atol=1e-5)
    assert (merged[f"{q}.weight"] - state[f"{q}.weight"]).abs().max() > 1e-2  # adapters count
    for name, tensor in state.items():
        if name != f"{q}.weight":
            assert torch.equal(merged[name], tensor), name
