"""`scaletrain export --format peft` of a LoRA checkpoint loads in peft with our logits; the
merged `--format hf` export equals the unmerged LoRA network; a plain checkpoint is refused."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import post_training_stages
from tests.helpers import small_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    from launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("peft") / "run"
    raw = small_config(
        run_dir, corpus, train={"max_steps": 4, "eval_every": 0, "lr": 2e-2, "warmup_steps": 0}
    )
    raw["lora"] = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": TARGETS}
    post_training_stages.train_in_process(raw, "lora_pretrain", monitors=False)
    return run_dir / "checkpoints" / "step_00000004"


def lora_model(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's network unmerged: base weights plus adapters, as trained."""
    from model import build_model
    from model.lora import LoRAConfig, apply_lora
    from trainer.config import load_job_config

    config = load_job_config(checkpoint / "config.yaml", ignore_unknown_sections=True)
    lora = json.loads(
        json.dumps(__import__("yaml").safe_load((checkpoint / "config.yaml").read_text())["lora"])
    )
    model = build_model(config.model, "cpu", seed=0)
    apply_lora(model, LoRAConfig(**lora))
    state = load_file(checkpoint / "model.safetensors")
    assert any(name.endswith("lora_B") for name in state)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


def test_peft_export_loads_in_peft_with_our_logits(lora_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    code, _, err = run_main(["export", str(lora_checkpoint), "--format", "peft", "--out", str(out)])
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file() and (
        out / "base" / "config.json"
    ).is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["r"] == 4
        and config["lora_alpha"] == 8.0
        and sorted(config["target_modules"]) == sorted(TARGETS)
    )
    # The base folder holds no adapter tensors.
    base_names = load_file(out / "base" / "model.safetensors").keys()
    assert not [n for n in base_names if "lora" in n]

    ours = lora_model(lora_checkpoint)
    batch = tokens(ours.config.vocab_size)
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base")
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        expected = ours(batch)
        torch.testing.assert_close(theirs(input_ids=batch).logits, expected, atol=1e-4, rtol=0)
        # Negative control: the base alone is far off, so the trained adapters matter.
        with theirs.disable_adapter():
            assert (theirs(input_ids=batch).logits - expected).abs().max() > 1e-2


def test_merged_hf_export_equals_the_lora_network(lora_checkpoint: Path, tmp_path: Path) -> None:
    code, _, err = run_main(
        ["export", str(lora_checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")]
    )
    assert code == 0, err
    ours = lora_model(lora_checkpoint)
    batch = tokens(ours.config.vocab_size)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = ours(batch)
        torch.testing.assert_close(merged(input_ids=batch).logits, expected, atol=1e-5, rtol=0)
        # Negative control: the adapters moved the network (a base-only export would fail).
        for module in ours.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.zero_()
        assert (ours(batch) - expected).abs().max() > 1e-2


def test_a_checkpoint_without_adapters_is_refused(tmp_path: Path, corpus: Path) -> None:
    raw = small_config(tmp_path / "run", corpus, train={"max_steps": 1, "eval_every": 0})
    post_training_stages.train_in_process(raw, "pretrain")
    code, _, err = run_main(
        ["export", str(tmp_path / "run"), "--format", "peft", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and err.count("\n") == 1 and "not a LoRA checkpoint" in err, err
    assert not (tmp_path / "o").exists()
