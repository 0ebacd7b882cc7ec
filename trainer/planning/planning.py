"""`scaletrain plan`: from a compute budget to a model shape, token count, batch, memory and config.

The rule (trainer.planning.scaling_laws) gives the compute-optimal N and D; this module finds a
Llama-style shape with that many parameters, sizes the batch and learning rate, estimates
per-GPU memory and writes a config `scaletrain train` accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.config import DataConfig, TokenizerConfig
from model.config import ModelConfig
from model.flops import param_counts
from trainer.config import (
    CheckpointConfig,
    JobConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    write_config,
)
from trainer.config_io import ConfigError
from trainer.planning.hardware import PEAK_BF16_FLOPS
from trainer.planning.memory import model_state_memory
from trainer.planning.scaling_laws import (
    HOFFMANN_2022,
    LOSS_FITS,
    LossFit,
    approach1_optimum,
    overtrained_optimum,
)

DEFAULT_MFU = 0.40  # a typical well-tuned dense run on A100/H100 (PaLM reports 46%, OPT ~35%)
# Device memory in GiB of the common variant of each accelerator (vendors' datasheets).
GPU_MEMORY_GB: dict[str, float] = {
    "H200": 141.0,
    "H100": 80.0,
    "A100": 80.0,
    "L40S": 48.0,
    "A10G": 24.0,
    "V100": 32.0,
    "MI300X": 192.0,
}
# Share of device memory a plan may fill: the CUDA context, allocator fragmentation and
# communication buffers take the rest.
USABLE_MEMORY_FRACTION = 0.9
BATCH_LR_SOURCE = (
    "DeepSeek LLM (DeepSeek-AI 2024), eq. 1: global batch B_opt = 0.2920 C^0.3271 tokens, "
    "lr_opt = 0.3118 C^-0.1250 (AdamW, warmup then decay)"
)
ACTIVATION_SOURCE = (
    "Korthikanti et al. 2022: 34 s b h bytes per layer with flash attention (no s^2 term), "
    "2 s b h per layer with full recomputation, plus fp32 logits and their gradient"
)


def gpu_peak_flops(gpu: str) -> float:
    """Peak dense bf16 FLOP/s of a named GPU; unknown names are a one-line user error."""
    key = gpu.upper()
    if key not in PEAK_BF16_FLOPS:
        raise ConfigError(f"--gpu: unknown GPU {gpu!r} (known: {', '.join(PEAK_BF16_FLOPS)})")
    return PEAK_BF16_FLOPS[key]


def budget_flops(gpus: int, hours: float, gpu: str, mfu: float) -> float:
    """Training FLOPs that N GPUs deliver in H hours at model-FLOPs utilisation `mfu`."""
    if gpus <= 0 or hours <= 0:
        raise ConfigError("--gpus/--hours: must be positive")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu: must be in (0, 1], got {mfu}")
    return gpus * hours * 3600.0 * gpu_peak_flops(gpu) * mfu


# ---------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class MoESpec:
    """Experts per MoE layer and experts each token is routed to."""

    experts: int
    top_k: int


def parse_moe(text: str) -> MoESpec:
    """'8:2' -> MoESpec(8, 2)."""
    experts, sep, top_k = text.partition(":")
    try:
        spec = MoESpec(int(experts), int(top_k))
    except ValueError:
        raise ConfigError(f"--moe: expected EXPERTS:TOPK such as 8:2, got {text!r}") from None
    if not sep or spec.top_k < 1 or spec.experts < spec.top_k:
        raise ConfigError(f"--moe: need 1 <= TOPK <= EXPERTS, got {text!r}")
    return spec


@dataclass(frozen=True)
class Architecture:
    """A planned shape: the dense ModelConfig of the active path, and MoE totals if any.

    For MoE each layer has `experts` SwiGLU experts of `expert_ffn_dim` (the dense Llama FFN
    size for `dim`) and a router; the dense config's FFN is top_k experts wide, so it has
    exactly the active parameters (less the small router).
    """

    model: ModelConfig
    total_params: int
    active_params: int
    moe: MoESpec | None = None
    expert_ffn_dim: int | None = None


def _target_aspect_ratio(n_params: float) -> float:
    """dim / n_layers: ~64 at 125M (GPT-3 Small) rising to ~128 at 7B and above (Llama, GPT-3)."""
    low, high = math.log(125e6), math.log(7e9)
    position = min(max((math.log(n_params) - low) / (high - low), 0.0), 1.0)
    return 64.0 * 2.0**position


def _shape(dim: int, n_layers: int, vocab: int, tie: bool, seq_len: int) -> ModelConfig:
    # head_dim 128 from dim 1024 up (Llama), 64 below, 32 for the tiny sweep models.
    head_dim = 128 if dim >= 1024 else 64 if dim >= 256 else 32
    n_heads = dim // head_dim
    # Grouped-query attention with 8 KV heads (Llama 2/3) once there are enough heads.
    n_kv_heads = 8 if n_heads >= 16 and n_heads % 8 == 0 else n_heads
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        # FFN rounded to a multiple of 256 (64 for small widths) for tensor-core tiles.
        multiple_of=256 if dim >= 1024 else 64,
        max_seq_len=seq_len,
        tie_embeddings=tie,
    )


def _counts(model: ModelConfig, moe: MoESpec | None) -> tuple[int, int, int | None]:
    """(total, active, expert_ffn_dim) of a shape, MoE added analytically."""
    dense = param_counts(model).total
    if moe is None:
        return dense, dense, None
    ffn = model.ffn_dim
    per_expert = 3 * model.dim * ffn
    router = model.dim * moe.experts
    active = dense + model.n_layers * ((moe.top_k - 1) * per_expert + router)
    total = dense + model.n_layers * ((moe.experts - 1) * per_expert + router)
    return total, active, ffn


def plan_architecture(
    n_params: float,
    vocab_size: int = 32000,
    seq_len: int = 2048,
    tie_embeddings: bool = False,
    moe: MoESpec | None = None,
    tolerance: float = 0.03,
) -> Architecture:
    """The shape whose (active) parameter count, embeddings included, is closest to `n_params`.

    Searches widths in whole heads (coarser as models grow, so head counts stay divisible)
    and all depths; among shapes within
    `tolerance` of the target keeps the one nearest the target aspect ratio dim / n_layers,
    preferring head counts divisible by 8.
    """
    target_ratio = _target_aspect_ratio(n_params)
    best: tuple[float, Architecture] | None = None
    closest: tuple[float, Architecture] | None = None
    dims = [
        *range(64, 256, 32),
        *range(256, 1024, 64),
        *range(1024, 4096, 128),
        *range(4096, 8192, 512),  # from here head counts stay multiples of 4 and 8
        *range(8192, 32769, 1024),
    ]
    for dim in dims:
        one_layer = _counts(_shape(dim, 1, vocab_size, tie_embeddings, seq_len), moe)[1]
        per_layer_active = (
            _counts(_shape(dim, 2, vocab_size, tie_embeddings, seq_len), moe)[1] - one_layer
        )
        fixed = one_layer - per_layer_active
        layers = max(1, round((n_params - fixed) / per_layer_active))
        for n_layers in {max(1, layers - 1), layers, layers + 1}:
            model = _shape(dim, n_layers, vocab_size, tie_embeddings, seq_len)
            total, active, expert_ffn = _counts(model, moe)
            arch = Architecture(model, total, active, moe, expert_ffn)
            error = abs(active / n_params - 1.0)
            if closest is None or error < closest[0]:
                closest = (error, arch)
            if error <= tolerance and n_layers >= 2:
                score = abs(math.log(dim / n_layers / target_ratio)) + 10 * error
                # Head counts divisible by 8 (then 4) split evenly over tensor-parallel ranks.
                heads = model.n_heads
                score += 0.25 * (heads % 8 != 0) + 0.25 * (heads % 4 != 0) if dim >= 1024 else 0
                if best is None or score < best[0]:
                    best = (score, arch)
    if best is not None:
        return best[1]
    assert closest is not None
    raise ConfigError(
        f"plan: no shape with vocab {vocab_size} has about {n_params:.3g} parameters (nearest "
        f"{closest[1].active_params:.3g}); raise the budget or lower --vocab-size"
    )


# ---------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes: model states for each ZeRO stage, activations of one micro-batch."""

    model_states_bytes: dict[int, float]
    activations_bytes: float
    activations_checkpointed_bytes: float


def activation_bytes(
    model: ModelConfig, seq_len: int, micro_batch_size: int, checkpointing: bool
) -> float:
    """Activation memory of one micro-batch in bf16 (Korthikanti et al. 2022, flash attention)."""
    tokens = seq_len * micro_batch_size
    per_layer = (2 if checkpointing else 34) * tokens * model.dim
    logits = 8 * tokens * model.require_vocab()  # fp32 logits + their gradient
    return float(model.n_layers * per_layer + logits)


def estimate_memory(
    arch: Architecture, world_size: int, seq_len: int, micro_batch_size: int
) -> MemoryEstimate:
    """Memory per GPU in mixed-precision Adam: every expert's states, one micro-batch's activations."""
    states = {
        stage: model_state_memory(arch.total_params, stage, world_size, "bf16").device_bytes
        for stage in range(4)
    }
    return MemoryEstimate(
        states,
        activation_bytes(arch.model, seq_len, micro_batch_size, checkpointing=False),
        activation_bytes(arch.model, seq_len, micro_batch_size, checkpointing=True),
    )


# ---------------------------------------------------------------------------- the plan
@dataclass
class PlanRequest:
    """What the user asked for; exactly one of `flops` or (gpus, hours, gpu) sets the budget."""

    flops: float | None = None
    gpus: int | None = None
    hours: float | None = None
    gpu: str | None = None
    mfu: float = DEFAULT_MFU
    rule: str = "chinchilla"
    custom_fit: LossFit | None = None
    tokens_per_param: float | None = None
    moe: MoESpec | None = None
    vocab_size: int = 32000
    seq_len: int = 2048
    tie_embeddings: bool = False
    micro_batch_size: int = 1
    zero_stage: int | None = None  # None: the lowest stage that fits


@dataclass
class Plan:
    """The answer to `scaletrain plan`, ready for text or JSON output."""

    flops: float
    rule: str
    loss_fit: LossFit
    target_params: float
    target_tokens: float
    arch: Architecture
    tokens: int
    predicted_loss: float
    global_batch_tokens: int
    lr: float
    warmup_steps: int
    steps: int
    gpu: str | None
    gpus: int
    mfu: float
    wall_clock_hours: float | None
    gpu_hours: float | None
    memory: MemoryEstimate
    zero_stage: int
    micro_batch_size: int
    seq_len: int
    gpu_memory_gb: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return self.arch.total_params

    @property
    def active_params(self) -> int:
        return self.arch.active_params

    def memory_per_gpu_bytes(self, checkpointing: bool = True) -> float:
        activations = (
            self.memory.activations_checkpointed_bytes
            if checkpointing
            else self.memory.activations_bytes
        )
        return self.memory.model_states_bytes[self.zero_stage] + activations

    def fits(self, stage: int, checkpointing: bool) -> bool | None:
        """Whether stage + activations fit the named GPU; None when no GPU was named."""
        if self.gpu_memory_gb is None:
            return None
        activations = (
            self.memory.activations_checkpointed_bytes
            if checkpointing
            else self.memory.activations_bytes
        )
        need = self.memory.model_states_bytes[stage] + activations
        return need <= USABLE_MEMORY_FRACTION * self.gpu_memory_gb * 2**30

    def to_json(self) -> dict[str, Any]:
        """The `--json` object (INTERFACE.md keys first, then details)."""
        gib = 2**30
        model = self.arch.model
        return {
            "flops": self.flops,
            "params": self.params,
            "active_params": self.active_params,
            "tokens": self.tokens,
            "predicted_loss": self.predicted_loss,
            "global_batch_tokens": self.global_batch_tokens,
            "steps": self.steps,
            "gpu_hours": self.gpu_hours,
            "memory_per_gpu_gb": self.memory_per_gpu_bytes() / gib,
            "model": {
                "dim": model.dim,
                "n_layers": model.n_layers,
                "n_heads": model.n_heads,
                "n_kv_heads": model.kv_heads,
                "ffn_hidden_dim": model.ffn_dim,
                "vocab_size": model.require_vocab(),
                "tie_embeddings": model.tie_embeddings,
                "max_seq_len": model.max_seq_len,
                "moe_experts": self.arch.moe.experts if self.arch.moe else None,
                "moe_top_k": self.arch.moe.top_k if self.arch.moe else None,
                "expert_ffn_dim": self.arch.expert_ffn_dim,
            },
            "rule": self.rule,
            "loss_fit": {
                "name": self.loss_fit.name,
                "E": self.loss_fit.E,
                "A": self.loss_fit.A,
                "B": self.loss_fit.B,
                "alpha": self.loss_fit.alpha,
                "beta": self.loss_fit.beta,
            },
            "target_params": self.target_params,
            "target_tokens": self.target_tokens,
            "tokens_per_param": self.tokens / self.active_params,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "batch_lr_source": BATCH_LR_SOURCE,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "gpu": self.gpu,
            "gpus": self.gpus,
            "mfu": self.mfu,
            "wall_clock_hours": self.wall_clock_hours,
            "zero_stage": self.zero_stage,
            "memory_gb": {
                "model_states_by_zero_stage": {
                    str(stage): value / gib
                    for stage, value in self.memory.model_states_bytes.items()
                },
                "activations": self.memory.activations_bytes / gib,
                "activations_checkpointed": self.memory.activations_checkpointed_bytes / gib,
                "gpu_memory": self.gpu_memory_gb,
                "fits_by_zero_stage": {
                    str(stage): {
                        "checkpointing": self.fits(stage, True),
                        "no_checkpointing": self.fits(stage, False),
                    }
                    for stage in range(4)
                },
            },
            "notes": self.notes,
        }


def batch_and_lr(flops: float) -> tuple[float, float]:
    """DeepSeek LLM's compute-optimal global batch (tokens) and peak learning rate."""
    return 0.2920 * flops**0.3271, 0.3118 * flops**-0.1250


def make_plan(request: PlanRequest) -> Plan:
    """Turn a budget into a full plan (see module docstring)."""
    if request.flops is not None:
        if request.flops <= 0:
            raise ConfigError(f"--flops: must be positive, got {request.flops}")
        flops = float(request.flops)
    else:
        if request.gpus is None or request.hours is None or request.gpu is None:
            raise ConfigError("plan: give --flops F, or --gpus N --hours H --gpu NAME")
        flops = budget_flops(request.gpus, request.hours, request.gpu, request.mfu)
    gpu = request.gpu.upper() if request.gpu else None
    gpus = request.gpus or 1
    if request.rule == "custom" or request.custom_fit is not None:
        if request.custom_fit is None:
            raise ConfigError("--rule custom: needs --fit E=..,A=..,B=..,alpha=..,beta=..")
        loss_fit, rule = request.custom_fit, "custom"
    elif request.rule == "chinchilla":
        # Approach 1 has no loss model of its own; its paper's parametric fit predicts the loss.
        loss_fit, rule = HOFFMANN_2022, "chinchilla"
    elif request.rule in LOSS_FITS:
        loss_fit, rule = LOSS_FITS[request.rule], request.rule
    else:
        raise ConfigError(f"--rule: unknown rule {request.rule!r}")

    notes: list[str] = []
    if request.tokens_per_param is not None:
        target_params, target_tokens = overtrained_optimum(flops, request.tokens_per_param)
        notes.append(
            f"over-trained: {request.tokens_per_param:g} tokens per parameter instead of the "
            f"{rule} optimum"
        )
    elif rule == "chinchilla":
        target_params, target_tokens = approach1_optimum(flops)
    else:
        target_params, target_tokens = loss_fit.optimum(flops)

    arch = plan_architecture(
        target_params, request.vocab_size, request.seq_len, request.tie_embeddings, request.moe
    )
    # Compute is spent on the active parameters; the tokens follow from C = 6 N_active D.
    tokens = round(flops / (6.0 * arch.active_params))
    predicted_loss = loss_fit.loss(arch.active_params, tokens)
    if request.moe is not None:
        notes.append(
            "MoE: loss predicted from active parameters (a dense fit; MoE usually does better); "
            "the --out config is the dense active shape, since model configs have no MoE keys yet"
        )

    batch_tokens, lr = batch_and_lr(flops)
    # Whole sequences, a power of two of them (at least one per GPU), divisible by the GPUs.
    seqs = max(1, 2 ** round(math.log2(max(batch_tokens / request.seq_len, 1.0))))
    seqs = max(gpus, gpus * math.ceil(seqs / gpus)) if seqs % gpus else seqs
    steps = max(1, round(tokens / (seqs * request.seq_len)))
    global_batch_tokens = seqs * request.seq_len
    if steps < 100:
        notes.append(f"only {steps} optimizer steps: the budget is small for this batch")
    warmup = min(2000, max(1, steps // 20))

    wall_clock = gpu_hours = None
    gpu_memory_gb = None
    if gpu is not None:
        peak = gpu_peak_flops(gpu)
        gpu_hours = flops / (peak * request.mfu) / 3600.0
        wall_clock = gpu_hours / gpus
        gpu_memory_gb = GPU_MEMORY_GB.get(gpu)

    per_gpu_seqs = seqs // gpus
    micro = min(request.micro_batch_size, per_gpu_seqs)
    memory = estimate_memory(arch, gpus, request.seq_len, micro)
    plan = Plan(
        flops=flops,
        rule=rule,
        loss_fit=loss_fit,
        target_params=target_params,
        target_tokens=target_tokens,
        arch=arch,
        tokens=tokens,
        predicted_loss=predicted_loss,
        global_batch_tokens=global_batch_tokens,
        lr=lr,
        warmup_steps=warmup,
        steps=steps,
        gpu=gpu,
        gpus=gpus,
        mfu=request.mfu,
        wall_clock_hours=wall_clock,
        gpu_hours=gpu_hours,
        memory=memory,
        zero_stage=3,
        micro_batch_size=micro,
        seq_len=request.seq_len,
        gpu_memory_gb=gpu_memory_gb,
        notes=notes,
    )
    if request.zero_stage is not None:
        if request.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage: must be 0-3, got {request.zero_stage}")
        plan.zero_stage = request.zero_stage
    else:
        # The lowest stage that fits with activation checkpointing: less communication.
        plan.zero_stage = next((s for s in range(4) if plan.fits(s, True)), 3)
    if plan.fits(plan.zero_stage, True) is False:
        notes.append(
            f"does not fit {gpu} at ZeRO-{plan.zero_stage} on {gpus} GPUs: add GPUs or use "
            "parallel.offload=cpu"
        )
    return plan


def plan_job_config(plan: Plan, run_dir: str = "runs/planned") -> JobConfig:
    """A complete `scaletrain train` config for the plan (data: the embedded corpus; edit it)."""
    model = plan.arch.model
    if plan.arch.moe is not None:
        # The dense active path: top_k experts' worth of FFN in one SwiGLU.
        model = ModelConfig(
            **{
                **{k: getattr(model, k) for k in ("vocab_size", "dim", "n_layers", "n_heads")},
                "n_kv_heads": model.kv_heads,
                "ffn_hidden_dim": model.ffn_dim * plan.arch.moe.top_k,
                "max_seq_len": model.max_seq_len,
                "tie_embeddings": model.tie_embeddings,
            }
        )
    return JobConfig(
        run=RunConfig(dir=run_dir),
        model=model,
        tokenizer=TokenizerConfig(vocab_size=model.require_vocab()),
        data=DataConfig(seq_len=plan.seq_len),
        train=TrainConfig(
            max_steps=plan.steps,
            global_batch_tokens=plan.global_batch_tokens,
            micro_batch_size=plan.micro_batch_size,
            lr=float(f"{plan.lr:.3g}"),
            warmup_steps=plan.warmup_steps,
            schedule="cosine",
            # Hoffmann et al. 2022: cosine decayed 10x over exactly the planned horizon.
            min_lr_ratio=0.1,
            eval_every=max(1, plan.steps // 10),
        ),
        parallel=ParallelConfig(zero_stage=plan.zero_stage, precision="auto"),
        checkpoint=CheckpointConfig(every=max(1, plan.steps // 10), keep=3),
    )


def write_plan_config(plan: Plan, path: str | Path, run_dir: str = "runs/planned") -> None:
    """Write the plan's config, headed by a comment that records the plan it came from."""
    write_config(plan_job_config(plan, run_dir), path)
    header = [
        f"# written by `scaletrain plan`: {plan.flops:.3g} FLOPs, rule {plan.rule}, "
        f"{plan.params:,} params ({plan.active_params:,} active), {plan.tokens:,} tokens,",
        f"# predicted loss {plan.predicted_loss:.3f} ({plan.loss_fit.name}). "
        "data.train is the embedded corpus: point it at your data.",
    ]
    if plan.arch.moe is not None:
        header.append(
            f"# NOTE: planned as MoE {plan.arch.moe.experts}:{plan.arch.moe.top_k}; model configs "
            "have no MoE keys yet, so this is the dense shape of the active path."
        )
    text = Path(path).read_text()
    Path(path).write_text("\n".join(header) + "\n" + text)
