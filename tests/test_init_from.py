"""`model.init_from` alone defines the network; keys beside it must agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from model.config import ModelConfig
from trainer import checkpoint as ckpt
from trainer.config import JobConfig
from trainer.config_io import ConfigError
from trainer.init_from import resolve_init_from_model, source_model_config

transformers = pytest.importorskip("transformers")

HF_QWEN3: dict[str, Any] = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 50000.0,
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF_QWEN3))
    model.save_pretrained(folder)
    return folder


def write_run(run_dir: Path, model: dict[str, Any], step: int = 10) -> Path:
    """A run dir with one complete checkpoint whose config.yaml has `model` and sections this
    reader does not know (a later stage's), as a newer scaletrain would write."""
    root = run_dir / "checkpoints"
    folder = root / ckpt.step_dir_name(step)
    folder.mkdir(parents=True)
    raw = JobConfig().to_dict()
    raw["model"] = model
    raw["sft"] = {"train_on": "assistant", "packing": True}
    raw["lora"] = {"rank": 8}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    ckpt.write_manifest(folder, {"step": step})
    (root / ckpt.LATEST).write_text(folder.name + "\n")
    return run_dir


def test_shape_comes_from_an_hf_folder(hf_dir: Path) -> None:
    config = resolve_init_from_model({"init_from": f"hf:{hf_dir}"}, f"hf:{hf_dir}")
    assert (config.dim, config.n_layers, config.n_heads, config.kv_heads) == (64, 3, 4, 2)
    assert (config.head_dim, config.ffn_dim, config.vocab_size) == (32, 96, 97)
    assert config.qk_norm and config.rope_theta == 50000.0 and config.norm_eps == 1e-6
    assert config.init_from == f"hf:{hf_dir}"


def test_shape_comes_from_our_checkpoint_and_unknown_sections_are_ignored(
    tmp_path: Path,
) -> None:
    model = {"preset": "tiny", "dim": 96, "n_layers": 3, "vocab_size": 320, "max_seq_len": 256}
    run = write_run(tmp_path / "run", model)
    for source in (run, run / "checkpoints" / "step_00000010"):  # run dir or checkpoint folder
        config = resolve_init_from_model({"init_from": str(source)}, str(source))
        assert (config.dim, config.n_layers, config.vocab_size) == (96, 3, 320)
        assert (config.n_heads, config.kv_heads, config.max_seq_len) == (4, 2, 256)
        assert config.preset == "tiny"


def test_agreeing_keys_pass_and_training_keys_apply(hf_dir: Path) -> None:
    source = f"hf:{hf_dir}"
    section = {
        "init_from": source,
        "dim": 64,
        "n_kv_heads": 2,
        "head_dim": 32,
        "ffn_hidden_dim": 96,
        "max_seq_len": 64,  # a shorter context for fine-tuning: allowed
        "aux_loss_coef": 0.0,
    }
    config = resolve_init_from_model(section, source)
    assert config.dim == 64 and config.max_seq_len == 64
    assert config.qk_norm  # from the source, not the default


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"dim": 128}, "model.dim: 128 does not match 64"),
        ({"n_kv_heads": 4}, "model.n_kv_heads: 4 does not match 2"),
        ({"ffn_hidden_dim": 128}, "model.ffn_hidden_dim: 128 does not match 96"),
        ({"qk_norm": False}, "model.qk_norm: False does not match True"),
        # A preset is a statement about the shape too: tiny's dim (128) is the first difference.
        ({"preset": "tiny"}, "model.dim: 128 does not match 64"),
    ],
)
def test_a_disagreeing_key_stops_with_one_line(
    hf_dir: Path, section: dict[str, Any], named: str
) -> None:
    source = f"hf:{hf_dir}"
    with pytest.raises(ConfigError) as info:
        resolve_init_from_model({"init_from": source, **section}, source)
    message = str(info.value)
    assert message.startswith(named) and "\n" not in message
    assert f"model.init_from: {source}" in message


def test_a_disagreeing_key_against_our_checkpoint(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"preset": "tiny", "vocab_size": 320})
    with pytest.raises(ConfigError, match=r"^model\.vocab_size: 4096 does not match 320"):
        resolve_init_from_model({"vocab_size": 4096}, str(run))
    config = resolve_init_from_model({"preset": "tiny", "vocab_size": 320}, str(run))
    assert config == ModelConfig(**{**config.__dict__})  # a valid, complete config
    assert config.dim == 128


def test_missing_sources_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.init_from: .*no complete checkpoint found"):
        source_model_config(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"model\.init_from: .*config\.json: missing"):
        source_model_config(f"hf:{tmp_path}")
