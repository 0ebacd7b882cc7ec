"""Ours vs theirs: every supported Hugging Face family, both directions, logits compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.generation import generate  # noqa: E402
from model.hf import HFFolder, HFFormatError, load_hf_model, save_model_as_hf  # noqa: E402

VOCAB = 256
SEQ = 24
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA everywhere
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    # Larger than the default 0.02, so attention is far from uniform and logits are O(1-10):
    # a wrong mask, RoPE or norm then moves them far beyond the 1e-5 tolerance.
    "initializer_range": 0.1,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so all three frequency bands occur
}
YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,  # interpolated, ramped and kept dimensions all occur
}

# name -> (config class, model class, extra config keys)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied-mqa": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "num_key_value_heads": 1},
    ),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama-bias-head-dim": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"attention_bias": True, "head_dim": 32},
    ),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 7}),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "qwen3-sliding": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0},
    ),
    # Local and full layers alternating, carried by layer_types.
    "qwen3-mixed-layers": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {
            "use_sliding_window": True,
            "sliding_window": 5,
            "layer_types": ["full_attention", "sliding_attention"],
        },
    ),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": YARN_ROPE}),
    "qwen2-yarn": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_parameters": YARN_ROPE}),
}


def hf_model(case: str, seed: int = 0) -> Any:
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    config._attn_implementation = "eager"  # the reference path, no fused kernels
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        # Random init leaves biases and norm weights at 0/1; perturb them so they are tested.
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers(case: str, tmp_path: Path) -> None:
    theirs = hf_model(case)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    batch = tokens()
    with torch.no_grad():
        expected = theirs(batch).logits
        got = ours(batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("case", "dropped"),
    [
        ("mistral-sliding", {"sliding_window": None}),
        ("qwen3-sliding", {"sliding_window": None}),
        ("llama3-rope-scaling", {"rope_scaling": None}),
        ("qwen3-mixed-layers", {"sliding_window_layers": None}),  # every layer local
        ("qwen3-mixed-layers", {"sliding_window": None, "sliding_window_layers": None}),
        ("llama-yarn", {"rope_scaling": None}),
        ("qwen2-bias", {"attention_bias": False}),
    ],
)
def test_each_feature_matters_at_these_sizes(
    case: str, dropped: dict[str, Any], tmp_path: Path
) -> None:
    """Negative control: the same weights without the feature are far off, so the match above
    is evidence that the feature is converted, not that the test cannot see it."""
    import dataclasses

    from model import build_model

    theirs = hf_model(case)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    without = build_model(dataclasses.replace(ours.config, **dropped), "meta")
    without.to_empty(device="cpu")
    state = {k: v for k, v in ours.state_dict().items() if k in without.state_dict()}
    without.load_state_dict(state, strict=True)
    without.init_rope()
    batch = tokens()
    with torch.no_grad():
        assert (without.eval()(batch) - theirs(batch).logits).abs().max() > 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_and_matches(case: str, tmp_path: Path) -> None:
    theirs = hf_model(case, seed=2)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    architecture = CASES[case][1]
    family = save_model_as_hf(ours, tmp_path / "export", architecture)
    assert family.architecture == architecture
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", attn_implementation="eager"
    ).eval()
    assert type(reloaded).__name__ == architecture
    batch = tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, ours(batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(batch).logits, theirs(batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["llama", "mistral-sliding", "qwen2-bias", "qwen3-qk-norm"])
def test_greedy_generation_is_identical(case: str, tmp_path: Path) -> None:
    theirs = hf_model(case, seed=4)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    prompt = tokens(batch=1, seq=6, seed=5)[0].tolist()
    new_tokens = 20  # past the Mistral window of 7: the cache path must slide too
    ours_ids = generate(ours, prompt, max_new_tokens=new_tokens)
    with torch.no_grad():
        theirs_ids = theirs.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert ours_ids == theirs_ids


def test_sharded_export_round_trips(tmp_path: Path) -> None:
    theirs = hf_model("llama", seed=6)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(HFFolder(tmp_path / "hf"))
    save_model_as_hf(ours, tmp_path / "export", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 3 and not (tmp_path / "export" / "model.safetensors").exists()
    assert len(index["weight_map"]) == len(ours.state_dict())
    again = load_hf_model(HFFolder(tmp_path / "export"))  # our reader, sharded
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    batch = tokens(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(again(batch), ours(batch), atol=0, rtol=0)
        torch.testing.assert_close(reloaded(batch).logits, ours(batch), atol=1e-5, rtol=1e-5)


def test_unsupported_and_broken_folders_are_one_line_errors(tmp_path: Path) -> None:
    theirs = hf_model("llama")
    theirs.save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(
        json.dumps(
            {**config, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        )
    )
    with pytest.raises(HFFormatError, match=r"DeepseekV3ForCausalLM.*not supported"):
        HFFolder(tmp_path / "hf")

    config_path.write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(HFFormatError, match=r"mlp\.\w+_proj\.weight.* has shape"):
        load_hf_model(HFFolder(tmp_path / "hf"))

    config_path.write_text(json.dumps(config))
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match=r"model\.safetensors: missing"):
        HFFolder(tmp_path / "hf")
    with pytest.raises(HFFormatError, match=r"config\.json: missing"):
        HFFolder(tmp_path)


# ---------------------------------------------------------------------------- checkpoints + CLI
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A real 2-step scaletrain run (subprocess, like `scaletrain train`)."""
    from tests.helpers import small_config
    from tests.test_training import train_in_subprocess

    tmp_path = tmp_path_factory.mktemp("trained")
    config = small_config(tmp_path / "run", corpus, train={"max_steps": 2, "eval_every": 0})
    result = train_in_subprocess(config, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path / "run"


def test_export_of_a_training_checkpoint_loads_in_transformers(
    trained_run: Path, tmp_path: Path
) -> None:
    from launch.cli import main
    from trainer.inference import load_checkpoint_model

    out = tmp_path / "export"
    assert main(["export", str(trained_run), "--format", "hf", "--out", str(out)]) == 0
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.model",
        "tokenizer.json",  # converted from tokenizer.model, exact on our probes
    } <= {p.name for p in out.iterdir()}
    loaded = load_checkpoint_model(trained_run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = loaded.tokenizer.encode("def compute_value(items):\n    return items + 1\n")
    batch = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(batch).logits, loaded.model(batch), atol=1e-5, rtol=1e-5)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == loaded.tokenizer.eos_id

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.eos_token_id == loaded.tokenizer.eos_id
    assert hf_tokenizer.bos_token_id == loaded.tokenizer.bos_id
    text = "def merge_node(size, index):\n    total = size + 42\n"
    ids = loaded.tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def test_import_writes_a_checkpoint_that_matches_the_hf_model(
    trained_run: Path, tmp_path: Path
) -> None:
    from launch.cli import main
    from trainer.inference import load_checkpoint_model

    hf_dir = tmp_path / "hf"
    assert (
        main(["export", str(trained_run), "--out", str(hf_dir), "--max-shard-size", "100KB"]) == 0
    )
    assert (hf_dir / "model.safetensors.index.json").is_file()  # the import reads shards
    out = tmp_path / "imported"
    assert main(["import", str(hf_dir), "--out", str(out)]) == 0
    loaded = load_checkpoint_model(out)  # verifies the manifest too
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    batch = tokens(seq=16, seed=8) % loaded.config.model.require_vocab()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch), theirs(batch).logits, atol=1e-5, rtol=1e-5)
    assert loaded.tokenizer.sha256 == load_checkpoint_model(trained_run).tokenizer.sha256
    # A second import onto a non-empty folder is refused in one line.
    assert main(["import", str(hf_dir), "--out", str(out)]) == 2
    assert main(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def test_import_keeps_weights_and_refuses_a_broken_tokenizer_json(tmp_path: Path) -> None:
    """Weights of a tokenizer.json-only folder import exactly (the tokenizer itself is tested in
    test_hf_tokenizer.py); an unreadable tokenizer.json is refused in one line, before writing."""
    from launch.cli import main
    from trainer.config import load_job_config
    from trainer.hf_checkpoint import import_hf

    hf_dir = tmp_path / "hf"
    theirs = hf_model("qwen2-bias")
    theirs.save_pretrained(hf_dir)
    out = import_hf(hf_dir, tmp_path / "ckpt")  # no tokenizer files: weights only
    config = load_job_config(out / "config.yaml")
    assert config.tokenizer.path is None and config.model.attention_bias
    from safetensors.torch import load_file

    ours = load_model_from_state(config.model, load_file(out / "model.safetensors"))
    batch = tokens(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ours(batch), theirs(batch).logits, atol=1e-5, rtol=1e-5)

    (hf_dir / "tokenizer.json").write_text("{}")
    assert main(["import", str(hf_dir), "--out", str(tmp_path / "ckpt2")]) == 2
    assert not (tmp_path / "ckpt2").exists()


def load_model_from_state(config: Any, state: dict[str, torch.Tensor]) -> Any:
    from model import build_model

    model = build_model(config, "meta")
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    model.init_rope()
    return model.eval()


def test_init_from_hf_starts_training_from_the_imported_weights(
    trained_run: Path, tmp_path: Path, corpus: Path
) -> None:
    from launch.cli import main
    from launch.environment import detect_environment
    from tests.helpers import small_config
    from trainer.config import job_config_from_dict
    from trainer.config_io import ConfigError
    from trainer.trainer import Trainer

    hf_dir = tmp_path / "hf"
    assert main(["export", str(trained_run), "--out", str(hf_dir)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    raw = small_config(tmp_path / "run", corpus, train={"max_steps": 1, "eval_every": 0})
    raw["model"]["init_from"] = f"hf:{hf_dir}"
    raw["tokenizer"] = {"path": str(hf_dir / "tokenizer.model")}
    trainer = Trainer(job_config_from_dict(raw), detect_environment())
    trainer.setup()
    batch = tokens(seq=16, seed=10) % 320
    model = trainer.engine.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), theirs(batch).logits, atol=1e-5, rtol=1e-5)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        ours_loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
        theirs_loss = theirs(inputs, labels=None).logits
        theirs_loss = torch.nn.functional.cross_entropy(theirs_loss.flatten(0, 1), labels.flatten())
    assert ours_loss.item() == pytest.approx(theirs_loss.item(), rel=1e-6)

    raw["model"]["rope_theta"] = 500000.0  # loads, computes nonsense: refused by name
    raw["run"]["dir"] = str(tmp_path / "run2")
    with pytest.raises(ConfigError, match=r"model\.rope_theta"):
        Trainer(job_config_from_dict(raw), detect_environment()).setup()


def test_export_picks_the_plainest_family_that_fits() -> None:
    from model import ModelConfig
    from model.hf import family_for

    def config(**overrides: Any) -> ModelConfig:
        return ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, **overrides)

    assert family_for(config()).architecture == "LlamaForCausalLM"
    assert family_for(config(sliding_window=8)).architecture == "MistralForCausalLM"
    assert family_for(config(attention_bias=True)).architecture == "Qwen2ForCausalLM"
    assert family_for(config(qk_norm=True, head_dim=32)).architecture == "Qwen3ForCausalLM"
    assert family_for(config(), "mistral").architecture == "MistralForCausalLM"
    with pytest.raises(HFFormatError, match=r"no supported architecture fits"):
        family_for(config(qk_norm=True, attention_bias=True))  # Qwen3 biases o_proj too
    with pytest.raises(HFFormatError, match=r"MistralForCausalLM cannot express qk_norm"):
        family_for(config(qk_norm=True), "MistralForCausalLM")
    # Layer patterns: Qwen2/Qwen3 carry them in layer_types, Mistral's one window cannot.
    mixed = config(qk_norm=True, head_dim=32, sliding_window=8, sliding_window_layers=[1])
    assert family_for(mixed).architecture == "Qwen3ForCausalLM"
    with pytest.raises(
        HFFormatError, match=r"^architecture: MistralForCausalLM cannot express a mix"
    ):
        family_for(config(sliding_window=8, sliding_window_layers=[0]), "mistral")
    with pytest.raises(HFFormatError, match=r"no supported architecture fits"):
        family_for(config(sliding_window=8, global_tokens=2))
    with pytest.raises(HFFormatError, match=r"Mistral\w+ cannot express global_tokens=2"):
        family_for(config(sliding_window=8, global_tokens=2), "mistral")
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    assert family_for(config(rope_scaling=yarn)).architecture == "LlamaForCausalLM"
    with pytest.raises(HFFormatError, match=r"cannot express rope_scaling of type 'yarn'"):
        family_for(config(rope_scaling=yarn), "mistral")


def test_shard_size_parsing() -> None:
    import argparse

    from launch.hf_cli import parse_size

    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000
    assert parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
