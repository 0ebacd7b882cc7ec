"""LoRA: identity at init, merge == unmerged, only adapters train, peft loads our export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from model.config import ModelConfig
from model.hf import HFFolder, HFFormatError, load_hf_model, save_model_as_hf
from model.hf.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_peft_adapter
from model.lora import (
    TARGETS,
    LoRAConfig,
    LoRAConfigError,
    adam_state_bytes,
    adapter_params_per_token,
    apply_lora,
    lora_parameter_counts,
    merge_lora,
    merged_state_dict,
    trainable_parameter_count,
    trained_flops_per_token,
)
from model.presets import preset_config
from model.transformer import build_model
from trainer.distributed import free_port

VOCAB = 97
DENSE = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
# Layer 0 dense, layer 1 MoE with a shared expert: every kind of target exists.
MOE = ModelConfig(
    vocab_size=VOCAB,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    max_seq_len=64,
    n_experts=4,
    top_k=2,
    moe_ffn_hidden_dim=32,
    n_shared_experts=1,
    first_dense_layers=1,
)
ALL = LoRAConfig(rank=4, alpha=8.0, targets=list(TARGETS))


def tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: torch.nn.Module, seed: int = 3, std: float = 0.1) -> None:
    """Non-zero B (and fresh A), so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_logits_equal_the_base_model_at_init(config: ModelConfig) -> None:
    model = build_model(config, seed=0).eval()
    batch = tokens()
    with torch.no_grad():
        base = model(batch)
        apply_lora(model, ALL)
        adapted = model(batch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("experts.gate_proj_lora_A" in n for n in names) == (config.n_experts > 0)
    assert any("shared_experts.up_proj.lora_B" in n for n in names) == (config.n_experts > 0)
    assert "output.lora_A" in names
    torch.testing.assert_close(adapted, base, atol=1e-6, rtol=0)
    # A is Kaiming-uniform (non-zero), B zero: the identity comes from B alone.
    lora_a = dict(model.named_parameters())["layers.0.attention.q_proj.lora_A"]
    assert lora_a.abs().min() > 0 and lora_a.abs().max() <= 1 / 64**0.5 + 1e-7


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_merged_equals_unmerged(config: ModelConfig) -> None:
    model = build_model(config, seed=0).eval()
    apply_lora(model, ALL)
    randomize_adapters(model)
    batch = tokens()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(batch)
        base = build_model(config, seed=0).eval()(batch)
    assert (unmerged - base).abs().max() > 0.1  # the adapters do change the logits

    merged = merged_state_dict(state, ALL)
    plain = build_model(config, "meta")
    assert set(merged) == set(plain.state_dict())  # adapter names gone, base names unchanged
    plain.to_empty(device="cpu")
    plain.load_state_dict(merged, strict=True)
    plain.init_rope()
    merge_lora(model)
    assert set(model.state_dict()) == set(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(batch), unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(batch), unmerged, atol=1e-5, rtol=0)

    # Negative control: folding with the wrong scaling (alpha 16 instead of 8) is far off.
    wrong = merged_state_dict(state, LoRAConfig(rank=4, alpha=16.0, targets=ALL.targets))
    plain.load_state_dict(wrong, strict=True)
    with torch.no_grad():
        assert (plain(batch) - unmerged).abs().max() > 1e-2


def test_only_adapters_train_and_experts_get_gradients() -> None:
    model = build_model(MOE, seed=0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "experts"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = tokens(seq=32)
    losses = []
    for step in range(4):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if "experts" in n}
            for projection in ("gate_proj", "up_proj", "down_proj"):
                # B starts at zero, so at step 0 only B's gradient is non-zero (A's is B^T g).
                grad = grads[f"layers.1.feed_forward.experts.{projection}_lora_B"]
                assert grad is not None and grad.abs().sum() > 0
                assert grads[f"layers.1.feed_forward.experts.{projection}"] is None
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
    experts_a = dict(model.named_parameters())["layers.1.feed_forward.experts.up_proj_lora_A"]
    assert experts_a.grad is not None and experts_a.grad.abs().sum() > 0  # once B moved
    assert len(optimizer.state) == len(trainable)
    # The optimizer-state bytes `--dry-run` shows are what AdamW really holds (fp32, no master).
    moments = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if key != "step"
    )
    assert moments == adam_state_bytes(trainable_parameter_count(model), fp32_master=False)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no torch._grouped_mm")
def test_grouped_gemm_path_matches_the_expert_loop() -> None:
    """The grouped-GEMM path (CUDA bf16 in training) folds the adapters into the weights; it
    must give the per-expert loop's outputs and gradients, also for an expert-parallel slice."""
    model = build_model(MOE, seed=0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=["experts"]))
    randomize_adapters(model)
    experts = model.moe_layers()[1].experts
    rows = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    counts = torch.tensor([3, 0, 4, 3])
    outputs, grads = [], []
    for grouped in (True, False):
        experts.zero_grad()
        out = experts(rows, counts, grouped=grouped)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in experts.parameters() if p.grad is not None])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    assert len(grads[0]) == len(grads[1]) == 6  # three projections, A and B each
    for grouped_grad, loop_grad in zip(*grads, strict=True):
        torch.testing.assert_close(grouped_grad, loop_grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # experts 2..3 only, as an expert-parallel rank computes them
        torch.testing.assert_close(
            experts(rows[3:], counts[2:], grouped=True, first_expert=2),
            experts(rows[3:], counts[2:], grouped=False, first_expert=2),
            atol=1e-5,
            rtol=1e-5,
        )


def test_dropout_applies_to_the_adapter_input_in_training_only() -> None:
    model = build_model(DENSE, seed=0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.5, targets=["q_proj"]))
    randomize_adapters(model)
    batch = tokens()
    with torch.no_grad():
        model.eval()
        first, second = model(batch), model(batch)
        model.train()
        torch.manual_seed(0)
        dropped = model(batch)
    assert torch.equal(first, second)
    assert (dropped - first).abs().max() > 1e-3


def test_config_errors_are_one_line() -> None:
    with pytest.raises(LoRAConfigError, match="targets: unknown target 'qkv'"):
        LoRAConfig(rank=8, targets=["qkv"])
    with pytest.raises(LoRAConfigError, match="rank: must be >= 0"):
        LoRAConfig(rank=-1)
    tied = ModelConfig(**{**DENSE.__dict__, "tie_embeddings": True})
    with pytest.raises(LoRAConfigError, match="lm_head is tied"):
        apply_lora(build_model(tied, "meta"), LoRAConfig(rank=4, targets=["lm_head"]))
    with pytest.raises(LoRAConfigError, match="none of experts exists"):
        apply_lora(build_model(DENSE, "meta"), LoRAConfig(rank=4, targets=["experts"]))
    # rank 0: full fine-tuning, nothing changes.
    model = build_model(DENSE, "meta")
    apply_lora(model, LoRAConfig(rank=0))
    assert trainable_parameter_count(model) == sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_closed_form() -> None:
    config = ModelConfig(**{**preset_config("1B")})
    rank = 16
    total, trainable = lora_parameter_counts(config, LoRAConfig(rank=rank))
    full_total, full_trainable = lora_parameter_counts(config, LoRAConfig(rank=0))
    kv = config.kv_heads * config.head_dim
    # q, k, v, o per layer: r * (in + out) each.
    per_layer = rank * ((2048 + 2048) + (2048 + kv) * 2 + (2048 + 2048))
    assert trainable == config.n_layers * per_layer
    assert total == full_total + trainable and full_trainable == full_total


def test_training_flops_count_a_frozen_base_and_the_routed_expert_adapters() -> None:
    """MFU's FLOPs: full training 6N + attention; with LoRA the base gets no weight gradients
    (4N) and each adapter parameter a token passes through costs 6: every attention/MLP/head
    pair, and of an MoE layer's expert pairs the top_k of n_experts the token is routed to."""
    from data_pipeline.batch import causal_lm_batch
    from model.flops import flops_per_token, matmul_params
    from trainer.objectives.causal_lm import CausalLMObjective

    seq = 32
    model = build_model(DENSE, seed=0)
    assert adapter_params_per_token(model, DENSE) is None
    assert trained_flops_per_token(model, DENSE, seq) == flops_per_token(DENSE, seq)
    attention = flops_per_token(DENSE, seq) - 6 * matmul_params(DENSE)

    rank, dim, kv = 4, 64, 2 * 16
    apply_lora(model, LoRAConfig(rank=rank, alpha=8.0, targets=["q_proj", "v_proj"]))
    adapters = DENSE.n_layers * rank * ((dim + dim) + (dim + kv))  # q, v: r * (in + out)
    assert adapter_params_per_token(model, DENSE) == adapters
    lora_flops = 4 * matmul_params(DENSE) + 6 * adapters + attention
    assert trained_flops_per_token(model, DENSE, seq) == lora_flops

    # The objective prices its tokens with it (the old 6N would be 1.5x the base's share).
    batch = causal_lm_batch(tokens(seq=seq + 1))
    output = CausalLMObjective(seq).train_step(model, batch, batch.num_target_tokens)
    assert output.flops == lora_flops * batch.num_tokens

    moe = build_model(MOE, seed=0)
    apply_lora(moe, ALL)
    expert_pairs = 3 * MOE.n_experts * ALL.rank * (dim + MOE.expert_dim)  # gate, up, down
    unrouted = expert_pairs - expert_pairs * MOE.top_k // MOE.n_experts
    assert adapter_params_per_token(moe, MOE) == trainable_parameter_count(moe) - unrouted

    # A reward model's backbone has no vocabulary head: 6 x (vocab x dim) fewer per token,
    # and a head adapter (lora_head target) is not counted either.
    head = 6 * VOCAB * dim
    no_head = flops_per_token(DENSE, seq, output_head=False)
    assert flops_per_token(DENSE, seq) - no_head == head
    with_head = build_model(DENSE, seed=0)
    apply_lora(with_head, LoRAConfig(rank=rank, alpha=8.0, targets=["q_proj", "lm_head"]))
    q_pairs = DENSE.n_layers * rank * (dim + dim)
    assert adapter_params_per_token(with_head, DENSE) == q_pairs + rank * (dim + VOCAB)
    assert adapter_params_per_token(with_head, DENSE, output_head=False) == q_pairs


# ---------------------------------------------------------------------------- peft
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_LLAMA: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,
}


def hf_llama_folder(folder: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_LLAMA))
    model.save_pretrained(folder)
    return folder


def test_peft_loads_our_adapter_on_the_exported_base(tmp_path: Path) -> None:
    base_dir = hf_llama_folder(tmp_path / "source")
    ours = load_hf_model(HFFolder(base_dir))
    # The base HF export is ours, written before the adapters exist.
    save_model_as_hf(ours, tmp_path / "base")
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=[*TARGETS[:7], "lm_head"])
    apply_lora(ours, lora)
    randomize_adapters(ours)
    ours.eval()
    out = save_peft_adapter(
        ours.state_dict(), ours.config, lora, tmp_path / "adapter", str(tmp_path / "base")
    )
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert "lm_head" in config["target_modules"] and "q_proj" in config["target_modules"]
    assert (out / ADAPTER_WEIGHTS).is_file()

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    batch = tokens()
    with torch.no_grad():
        expected = ours(batch)
        got = theirs(input_ids=batch).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        # Negative control: the base alone is far off, so the adapter weights were loaded.
        with theirs.disable_adapter():
            assert (theirs(input_ids=batch).logits - expected).abs().max() > 1e-2

    # The merged HF export computes the same logits in plain transformers.
    merge_lora(ours)
    save_model_as_hf(ours, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).logits, expected, atol=1e-4, rtol=0)


def test_moe_attention_and_head_adapters_export_for_peft(tmp_path: Path) -> None:
    config = ModelConfig(**{**MOE.__dict__, "n_shared_experts": 0, "qk_norm": True})
    model = build_model(config, seed=0).eval()
    save_model_as_hf(model, tmp_path / "base", "Qwen3MoeForCausalLM")
    lora = LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "o_proj", "lm_head"])
    apply_lora(model, lora)
    randomize_adapters(model)
    out = save_peft_adapter(
        model.state_dict(), config, lora, tmp_path / "adapter", "base", "Qwen3MoeForCausalLM"
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    batch = tokens()
    with torch.no_grad():
        expected = model(batch)
        torch.testing.assert_close(theirs(input_ids=batch).logits, expected, atol=1e-4, rtol=0)
        with theirs.disable_adapter():
            assert (theirs(input_ids=batch).logits - expected).abs().max() > 1e-2


def test_moe_expert_adapters_refuse_peft_export_but_merge(tmp_path: Path) -> None:
    # Qwen3-MoE's shape (QK-norm, no shared expert), so the merged model exports as one.
    config = ModelConfig(**{**MOE.__dict__, "n_shared_experts": 0, "qk_norm": True})
    model = build_model(config, seed=0).eval()
    lora = LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "experts"])
    apply_lora(model, lora)
    randomize_adapters(model)
    with pytest.raises(HFFormatError, match=r"experts adapters .* cannot be exported for peft"):
        save_peft_adapter(
            model.state_dict(), config, lora, tmp_path / "adapter", "base", "Qwen3MoeForCausalLM"
        )
    assert not (tmp_path / "adapter").exists()
    batch = tokens()
    with torch.no_grad():
        expected = model(batch)
    merge_lora(model)
    save_model_as_hf(model, tmp_path / "merged", "Qwen3MoeForCausalLM")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).logits, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- DeepSpeed
_ZERO_SCRIPT = """
import json, sys, torch, torch.distributed as dist, deepspeed
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from model.config import ModelConfig
from model.lora import LoRAConfig, apply_lora, trainable_parameter_count
from model.transformer import build_model
from trainer.optim import param_groups

stage = int(sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
config = ModelConfig(
    vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
    n_experts=4, top_k=2, moe_ffn_hidden_dim=32, first_dense_layers=1,
)
model = build_model(config, seed=0)
targets = ["q_proj", "v_proj", "down_proj", "experts", "lm_head"]
apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=targets))
before = {n: p.detach().clone() for n, p in model.named_parameters()}
optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
ds_config = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
    "steps_per_print": 2**31 - 1,
}
engine, optimizer, _, _ = deepspeed.initialize(
    model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
)
batch = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
losses = []
for _ in range(5):
    logits = engine(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
in_optimizer = sum(p.numel() for g in optimizer.optimizer.param_groups for p in g["params"])
if stage == 3:  # partitioned: the optimizer holds fp32 copies of this rank's partitions
    in_optimizer = sum(p.ds_numel for g in engine.optimizer.fp16_groups for p in g)
with GatheredParameters(list(model.parameters())):
    changed = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}
print("RESULT " + json.dumps({
    "losses": losses, "in_optimizer": in_optimizer,
    "trainable": sum(p.numel() for n, p in before.items() if "lora_" in n),
    "changed": changed,
}))
"""


# ~25 s on the shared 2-core machine, almost all of it importing and starting DeepSpeed.
@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])
def test_lora_trains_under_deepspeed_zero(stage: int, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", _ZERO_SCRIPT, str(stage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("RESULT "))
    assert report["in_optimizer"] == report["trainable"] > 0
    assert report["losses"][-1] < report["losses"][0]
    changed = report["changed"]
    for name, was_changed in changed.items():
        assert was_changed == ("lora_" in name), name
    # Every kind of adapter took part: dense, stacked experts, the head read as a matrix.
    for name in ("layers.0.feed_forward.down_proj.lora_B", "output.lora_A"):
        assert changed[name]
    assert changed["layers.1.feed_forward.experts.gate_proj_lora_B"]
