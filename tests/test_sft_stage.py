"""`scaletrain sft` on the one loop: equal steps however split, LoRA freezing, resume, and the
import -> sft -> export path checked against transformers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import TINY_MOE_MODEL, read_metrics

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A Qwen2.5-style template: a default system turn, ChatML turns, a generation prompt.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NAMES = ["value", "count", "items", "result", "node", "total", "index", "buffer"]


def write_conversations(path: Path, n: int, seed: int = 0) -> Path:
    """`n` short messages records (some multi-turn, some with a system turn)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            a, b = rng.sample(NAMES, 2)
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": "Answer in one line."})
            messages.append({"role": "user", "content": f"What does add_{a}({b}) return?"})
            messages.append({"role": "assistant", "content": f"It returns {b} + {a}."})
            if rng.random() < 0.4:
                messages.append({"role": "user", "content": f"And for {a}?"})
                messages.append({"role": "assistant", "content": f"{a} + {a}, twice {a}."})
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 folder (ChatML tokens in its tokenizer) with a realistic chat template."""
    from tests.test_hf_tokenizer import save_hf_folder

    folder = tmp_path_factory.mktemp("hf_qwen2")
    save_hf_folder("qwen2", folder)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = QWEN_TEMPLATE
    config_path.write_text(json.dumps(tokenizer_config))
    return folder


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("chats")
    write_conversations(folder / "train.jsonl", 96, seed=0)
    write_conversations(folder / "validation.jsonl", 16, seed=1)
    return folder


def sft_config(run_dir: Path, chats: Path, hf_dir: Path, **sections: dict[str, Any]) -> dict:
    """A raw sft config starting from the tiny HF folder; steps take milliseconds."""
    config: dict[str, Any] = {
        "run": {"dir": str(run_dir), "seed": 5},
        "model": {"init_from": f"hf:{hf_dir}", "max_seq_len": 128},
        "data": {
            "seq_len": 128,
            "train": [{"path": str(chats / "train.jsonl"), "name": "chats"}],
            "validation": [{"path": str(chats / "validation.jsonl"), "name": "chats"}],
        },
        "train": {
            "max_steps": 3,
            "global_batch_tokens": 1024,  # 8 rows of 128
            "lr": 1e-3,
            "warmup_steps": 0,
            "eps": 1e-3,
            "eval_every": 0,
            "eval_batches": 2,
            "progress": False,
            "sample_prompt": None,
        },
        "parallel": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"every": 0, "keep": 3},
        "chat": {"template": "auto"},
        "sft": {"packing": True},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def sft_in_process(raw: dict[str, Any]) -> Path:
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.stages import get_stage
    from trainer.trainer import Trainer

    get_stage("sft")  # registers the stage's config sections
    trainer = Trainer(job_config_from_dict(raw, stage="sft"), detect_environment(), "sft")
    trainer.setup()
    trainer.fit()
    return Path(raw["run"]["dir"])


def sft_cli(
    raw: dict[str, Any], tmp_path: Path, *extra: str, ranks: int = 1
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{Path(raw['run']['dir']).name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable]
    if ranks > 1:
        launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}"]
    return subprocess.run(
        [*launcher, "-m", "launch.cli", "sft", str(path), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def train_losses(run_dir: Path) -> list[float]:
    lines, _ = read_metrics(run_dir)
    return [line["loss"] for line in lines]


def checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item()) for k in b)


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Equal step losses (1e-5) and final weights (1e-5 relative) as the reference run's."""
    losses, reference = train_losses(run_dir), train_losses(reference_dir)
    print(run_dir.name, [abs(a / b - 1) for a, b in zip(losses, reference, strict=True)])
    assert losses == pytest.approx(reference, rel=1e-5)
    difference = max_relative_difference(
        checkpoint_weights(run_dir, 3), checkpoint_weights(reference_dir, 3)
    )
    print(f"{run_dir.name}: weights {difference:.3g} apart")
    assert difference < 1e-5


def test_sft_step_is_the_same_with_4_accumulation_steps(
    tmp_path: Path, chats: Path, hf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three steps on the same packed conversations (8 rows of 128 per step): 1 micro-batch
    and 4 accumulation steps give the same losses and weights (measured 3.7e-7 / 1.5e-7).
    Negative control: the 4-way split with each micro-batch's own mean (the usual bug) moves
    the losses by up to 9.7e-4, over the tolerance."""
    single = sft_in_process(sft_config(tmp_path / "single", chats, hf_dir))
    reference = train_losses(single)
    assert len(reference) == 3 and reference[-1] < reference[0]
    accumulated = sft_in_process(
        sft_config(tmp_path / "accumulated", chats, hf_dir, train={"micro_batch_size": 2})
    )
    assert_same_run(accumulated, single)

    from trainer.sft import SFTObjective

    original = SFTObjective.train_step

    def mean_of_means(self: SFTObjective, model: Any, batch: Any, global_units: int) -> Any:
        return original(self, model, batch, 4 * self.count_units(batch))

    monkeypatch.setattr(SFTObjective, "train_step", mean_of_means)
    biased = sft_in_process(
        sft_config(tmp_path / "biased", chats, hf_dir, train={"micro_batch_size": 2})
    )
    gaps = [abs(a / b - 1) for a, b in zip(train_losses(biased), reference, strict=True)]
    print("biased:", gaps)
    assert max(gaps) > 1e-4


def test_sft_step_is_the_same_on_two_ranks_at_zero3(
    tmp_path: Path, chats: Path, hf_dir: Path
) -> None:
    """The same three steps on 2 ranks x 2 accumulation steps at ZeRO-3 (torchrun, gloo) as on
    1 rank: losses within 1e-5 (measured 3.7e-7), weights 2.1e-6 apart (14 s)."""
    single = sft_in_process(sft_config(tmp_path / "single", chats, hf_dir))
    raw = sft_config(
        tmp_path / "two_ranks",
        chats,
        hf_dir,
        train={"micro_batch_size": 2},
        parallel={"zero_stage": 3, "precision": "fp32"},
    )
    result = sft_cli(raw, tmp_path, ranks=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_run(tmp_path / "two_ranks", single)


def test_lora_freezes_the_base_and_trains_moe_expert_adapters(
    tmp_path: Path, chats: Path, hf_dir: Path
) -> None:
    """A tiny-MoE model with LoRA on q_proj and the routed experts: the optimizer holds exactly
    the adapters; after training every base tensor in model.safetensors is bit-equal to the
    start, and every expert adapter pair (A and B of gate/up/down) moved."""
    from launch.environment import detect_environment
    from model.lora import is_adapter_name
    from trainer.config import job_config_from_dict
    from trainer.stages import get_stage
    from trainer.trainer import Trainer

    get_stage("sft")
    raw = sft_config(
        tmp_path / "moe_lora",
        chats,
        hf_dir,
        lora={"rank": 4, "alpha": 8.0, "targets": ["q_proj", "experts"]},
        train={"max_steps": 2, "lr": 1e-2},
        chat={"template": "chatml"},
    )
    raw["model"] = {**TINY_MOE_MODEL}
    raw["tokenizer"] = {"path": str(hf_dir)}
    trainer = Trainer(job_config_from_dict(raw, stage="sft"), detect_environment(), "sft")
    trainer.setup()
    named = dict(trainer.model.named_parameters())
    start = {name: p.detach().clone() for name, p in named.items()}
    adapters = {name for name in named if is_adapter_name(name)}
    assert any(".experts." in name for name in adapters)
    assert {name for name, p in named.items() if p.requires_grad} == adapters
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(named[name]) for name in adapters}
    trainer.fit()

    saved = checkpoint_weights(tmp_path / "moe_lora", 2)
    assert set(saved) == set(start)
    for name, tensor in saved.items():
        if name in adapters:
            continue
        assert torch.equal(tensor, start[name]), name
    expert_adapters = sorted(n for n in adapters if ".experts." in n)
    assert len(expert_adapters) == 2 * 3 * TINY_MOE_MODEL["n_layers"]  # A, B x gate/up/down
    for name in expert_adapters:
        assert not torch.equal(saved[name], start[name]), f"{name} did not train"
    # Negative control for the comparison itself: a trained adapter is not equal to its start.
    assert not all(torch.equal(saved[n], start[n]) for n in adapters)


def test_resume_mid_epoch_is_bit_exact(tmp_path: Path, chats: Path, hf_dir: Path) -> None:
    """Crash after step 3 (a checkpoint at step 2, mid-epoch), resume: the losses of steps
    3-4 and the final weights equal an uninterrupted run's exactly."""
    train_file = tmp_path / "train.jsonl"  # two bad records: counted once, also after resume
    bad = ['{"messages": [{"role": "user", "content": "hi"}]}', "{not json"]
    train_file.write_text((chats / "train.jsonl").read_text() + "\n".join(bad) + "\n")
    settings: dict[str, Any] = {
        "train": {"max_steps": 4},
        "checkpoint": {"every": 2, "keep": 3},
        "data": {"train": [{"path": str(train_file), "name": "chats"}]},
    }
    whole = sft_in_process(sft_config(tmp_path / "whole", chats, hf_dir, **settings))
    raw = sft_config(tmp_path / "crashed", chats, hf_dir, **settings)
    crashed = sft_cli(raw, tmp_path, "--fail-at-step", "3")
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    state = json.loads(
        (tmp_path / "crashed/checkpoints/step_00000002/trainer_state.json").read_text()
    )
    assert state["data"]["sft"]["epoch"] == 0 and state["data"]["sft"]["step_in_epoch"] == 2
    resumed = sft_in_process(raw)
    assert train_losses(resumed) == train_losses(whole)
    final, reference = checkpoint_weights(resumed, 4), checkpoint_weights(whole, 4)
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    counted = [
        json.loads((run / "checkpoints/step_00000004/trainer_state.json").read_text())
        for run in (whole, resumed)
    ]
    assert sum(counted[0]["skipped_records"].values()) == 2
    assert counted[1]["skipped_records"] == counted[0]["skipped_records"]
    # The check can fail: step 2's weights are not step 4's.
    early = checkpoint_weights(whole, 2)
    assert not all(torch.equal(early[k], reference[k]) for k in reference)


def test_import_sft_lora_export_matches_transformers(
    tmp_path: Path,
    chats: Path,
    hf_dir: Path,
    corpus: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """hf:DIR -> `sft` with LoRA -> export --format hf: transformers loads the folder, its
    apply_chat_template gives our ids, its greedy answer equals ours; the sft checkpoint (sft,
    chat, lora sections) still works with generate and eval."""
    from data_pipeline.chat import ChatTemplate, checkpoint_template
    from launch.cli import main
    from model.generation import generate
    from trainer.inference import load_checkpoint_model
    from trainer.sft import end_of_turn_ids

    raw = sft_config(
        tmp_path / "lora",
        chats,
        hf_dir,
        lora={"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]},
        train={"max_steps": 3, "lr": 1e-2, "eval_every": 3},
    )
    run_dir = sft_in_process(raw)
    _, evals = read_metrics(run_dir)
    assert evals and evals[-1]["split"] == "chats" and evals[-1]["eval_loss"] > 0
    checkpoint = run_dir / "checkpoints" / "step_00000003"
    written = yaml.safe_load((checkpoint / "config.yaml").read_text())
    assert written["lora"]["rank"] == 4 and "sft" in written and "chat" in written

    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_checkpoint_model(run_dir)
    template = ChatTemplate(checkpoint_template(ours.folder) or "", ours.tokenizer)
    assert template.source == QWEN_TEMPLATE
    messages = [{"role": "user", "content": "What does add_value(count) return?"}]
    our_ids = ours.tokenizer.encode(template.render_text(messages, True))
    their_ids = their_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert list(their_ids) == our_ids
    stop_ids = [*ours.tokenizer.stop_ids, *end_of_turn_ids(template)]
    assert ours.tokenizer.token_to_id("<|im_end|>") in stop_ids
    our_answer = generate(ours.model, our_ids, 16, stop_ids=stop_ids)
    with torch.no_grad():
        output = theirs.generate(
            torch.tensor([our_ids]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=ours.tokenizer.eos_id,
        )
    their_answer = output[0, len(our_ids) :].tolist()
    print("answer:", ours.tokenizer.decode(our_answer))
    assert their_answer == our_answer
    # The adapters were folded in: the export differs from the starting release.
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    batch = torch.tensor([our_ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(batch).logits, ours.model(batch), atol=1e-5, rtol=1e-5)
        assert (theirs(batch).logits - base(batch).logits).abs().max() > 1e-3

    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "What", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("What")
    data = str(corpus / "validation.jsonl")  # eval reads plain text
    assert main(["eval", str(run_dir), "--data", data, "--max-sequences", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] > 0


def test_lora_1b_config_dry_run_shows_the_adapters_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/sft-lora-1b.yaml passes --dry-run against a Llama-3.2-1B-shaped folder (its
    config.json; a placeholder weights file, only the shape is read). The trainable count is
    the closed form r * sum(in + out) over the 7 targets and 16 layers; the AdamW state is
    12 bytes per trainable parameter (bf16: fp32 master + two moments)."""
    from safetensors.torch import save_file

    from launch.cli import main

    folder = tmp_path / "llama-1b"
    folder.mkdir()
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(hf_config))
    save_file({"placeholder": torch.zeros(1)}, folder / "model.safetensors")
    chats = write_conversations(tmp_path / "chat.jsonl", 2)
    capsys.readouterr()
    code = main(
        [
            "sft",
            str(ROOT / "configs" / "sft-lora-1b.yaml"),
            "--dry-run",
            "--set",
            f"model.init_from=hf:{folder}",
            "--set",
            f"data.train=[{{path: {chats}}}]",
            "--set",
            f"data.validation=[{{path: {chats}}}]",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    dim, kv, ffn, layers, rank = 2048, 8 * 64, 8192, 16, 16
    per_layer = (dim + dim) * 2 + (dim + kv) * 2 + (dim + ffn) * 3  # q, o; k, v; gate, up, down
    trainable = rank * per_layer * layers
    line = next(line for line in out.splitlines() if line.startswith("trainable"))
    assert f"{trainable:,} of" in line, line
    assert f"AdamW state {trainable * 12 / 2**30:.3f} GiB" in line, line
    assert f"total {1_235_814_400:,}" in out  # the 1B model itself (tied embeddings)
    # FLOPs: the frozen base 4N (forward + activation gradients, no weight gradients; tied, so
    # N is every parameter, the embedding matrix as the head) + 6 per adapter parameter +
    # attention 12*L*H*Q*T, against full fine-tuning's 6N + attention.
    seq_len = yaml.safe_load((ROOT / "configs" / "sft-lora-1b.yaml").read_text())["data"]["seq_len"]
    attention = 12 * layers * 32 * 64 * seq_len
    lora_line = next(line for line in out.splitlines() if line.startswith("flops_per_token with"))
    printed = float(lora_line.split()[3])
    assert printed == pytest.approx(4 * 1_235_814_400 + 6 * trainable + attention, rel=1e-3)
    full = 6 * 1_235_814_400 + attention
    assert f"{printed / full:.2f}" in lora_line, lora_line


def test_sft_configs_load_with_their_sections() -> None:
    """The shipped sft configs load as sft configs (sections typed) and are refused by train."""
    from data_pipeline.config import ChatConfig
    from model.lora import LoRAConfig
    from trainer.config import job_config_from_dict
    from trainer.config_io import ConfigError
    from trainer.sft import SFTStageConfig

    raw = yaml.safe_load((ROOT / "configs" / "sft-tiny.yaml").read_text())
    raw["model"] = {"preset": "tiny"}  # runs/tiny need not exist for this check
    config = job_config_from_dict(raw, stage="sft")
    sft = config.sections["sft"]
    assert isinstance(sft, SFTStageConfig) and sft.sample_chat and sft.packing
    assert config.sections["chat"] == ChatConfig("chatml")
    assert config.sections["lora"] == LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="sft"):
        job_config_from_dict(raw, stage="pretrain")


def test_chatml_on_our_sentencepiece_checkpoint_adds_tokens_rows_and_answers(
    tmp_path: Path, chats: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `make sft` path on a small scale: a pretraining checkpoint (sentencepiece, no chat
    tokens) fine-tuned with chatml. <|im_start|>/<|im_end|> are added (tokenizer and two
    embedding rows, started at the mean row: the first eval happens before any update), every
    checkpoint carries the tokenizer and chat_template.jinja, and the end-of-run chat sample
    stops at <|im_end|>."""
    from launch.environment import detect_environment
    from tests.helpers import small_config
    from trainer.config import job_config_from_dict
    from trainer.inference import load_checkpoint_model
    from trainer.sft import ChatSample
    from trainer.trainer import Trainer

    base_raw = small_config(tmp_path / "base", corpus, train={"max_steps": 2, "eval_every": 0})
    base = Trainer(job_config_from_dict(base_raw), detect_environment())
    base.setup()
    base.fit()
    base_vocab = base.model.config.vocab_size
    assert base.tokenizer.token_to_id("<|im_end|>") < 0

    raw = sft_config(
        tmp_path / "chatml",
        chats,
        tmp_path,
        chat={"template": "chatml"},
        sft={"truncation": "drop", "sample_chat": "What does add_value(count) return?"},
        train={"max_steps": 2},
    )
    raw["model"] = {"init_from": str(tmp_path / "base")}
    raw["data"]["seq_len"] = 128
    from trainer.stages import get_stage

    get_stage("sft")
    trainer = Trainer(
        job_config_from_dict(raw, stage="sft"), detect_environment(), "sft", hooks=[ChatSample()]
    )
    trainer.setup()
    start, end = (
        trainer.tokenizer.token_to_id("<|im_start|>"),
        trainer.tokenizer.token_to_id("<|im_end|>"),
    )
    assert (start, end) == (base_vocab, base_vocab + 1)
    embeddings = trainer.model.tok_embeddings.weight.detach()
    torch.testing.assert_close(embeddings[start], embeddings[:base_vocab].mean(0))
    capsys.readouterr()
    trainer.fit()
    printed = capsys.readouterr().out
    assert "user: What does add_value(count) return?" in printed and "assistant:" in printed

    loaded = load_checkpoint_model(tmp_path / "chatml")
    assert loaded.model.config.vocab_size == base_vocab + 2
    assert loaded.tokenizer.token_to_id("<|im_end|>") == end
    assert (loaded.folder / "chat_template.jinja").read_text().startswith("{% for message")
    written = yaml.safe_load((loaded.folder / "config.yaml").read_text())
    assert written["model"]["vocab_size"] == base_vocab + 2
