"""LoRA: low-rank adapters applied from outside to a built `Transformer`, merged back, counted.

`apply_lora(model, config)` swaps the targeted projections for adapter-carrying versions of the
same modules, in place, like a parallelism step: the base weights stay the very same
`nn.Parameter` objects under the very same names (`layers.0.attention.q_proj.weight`), frozen,
and each target gains two ordinary parameters next to them (`...q_proj.lora_A` (r, in),
`...q_proj.lora_B` (out, r)). No hooks: every adapter parameter belongs to the module whose
`forward` reads it, so DeepSpeed ZeRO-3 gathers it like any other parameter.

The output is W x + (alpha / r) * B A dropout(x), with A Kaiming-uniform and B zero (PEFT's
default), so the adapted model computes exactly the base model's logits until B moves.

Stacked MoE experts (`GroupedExperts`, weights (E, out, in)) get one pair per expert,
`gate_proj_lora_A` (E, r, in) and `gate_proj_lora_B` (E, out, r). The output head, read as a
matrix by `Transformer.output_weight` (chunked losses use it directly), gets its adapter folded
into that matrix: W + (alpha / r) B A (no dropout there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model.block import TransformerBlock
from model.config import ModelConfig
from model.feed_forward import FeedForward
from model.flops import flops_per_token
from model.moe.experts import GroupedExperts, use_grouped_mm
from model.transformer import Transformer, build_model

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERTS_TARGET = "experts"  # the stacked routed-expert weights, all three projections
HEAD_TARGET = "lm_head"
TARGETS = (*ATTENTION_TARGETS, *MLP_TARGETS, EXPERTS_TARGET, HEAD_TARGET)
LORA_A, LORA_B = "lora_A", "lora_B"


class LoRAConfigError(ValueError):
    """A `lora` section that cannot be applied; the message starts with the offending key."""


@dataclass
class LoRAConfig:
    """The `lora` section: rank 0 means full fine-tuning (no adapters, every weight trains).

    `targets` are module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    (dense and shared-expert MLPs), experts (every routed expert's three projections) and
    lm_head (the untied output head).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise LoRAConfigError(f"rank: must be >= 0 (0: full fine-tuning), got {self.rank}")
        if self.alpha <= 0:
            raise LoRAConfigError(f"alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise LoRAConfigError("targets: empty; name at least one of " + ", ".join(TARGETS))
        for target in self.targets:
            if target not in TARGETS:
                raise LoRAConfigError(
                    f"targets: unknown target {target!r} (known: {', '.join(TARGETS)})"
                )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor on B A (PEFT without rsLoRA)."""
        return self.alpha / self.rank


def _init_pair(lora_a: torch.Tensor, lora_b: torch.Tensor, generator: torch.Generator) -> None:
    """A Kaiming-uniform with a=sqrt(5) (nn.Linear's and PEFT's init), B zeros."""
    if lora_a.is_meta:
        return
    with torch.no_grad():
        for matrix in lora_a.reshape(-1, *lora_a.shape[-2:]):  # one (r, in) per expert
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5), generator=generator)
        lora_b.zero_()


class LoRALinear(nn.Linear):
    """An `nn.Linear` (same weight/bias parameters) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_empty(base.out_features, rank))
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, shaped like the weight (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def plain(self) -> nn.Linear:
        """An `nn.Linear` holding this module's (base) weight and bias parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear


class LoRAHead(nn.Linear):
    """The output head with its adapter folded into `.weight`, as `Transformer.output_weight`
    reads the matrix rather than calling the module. The base matrix stays in `_parameters`
    under "weight", so state-dict names do not change."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        # register_parameter refuses a name the class defines (the `weight` property below).
        self._parameters["weight"] = cast(nn.Parameter, base.weight)
        self.bias = base.bias
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_empty(base.out_features, rank))
        self.scaling = scaling

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The adapted matrix W + scaling * B A (vocab, dim)."""
        base = self._parameters["weight"]
        assert base is not None
        return base + self.scaling * (self.lora_B @ self.lora_A)

    @property
    def base_weight(self) -> nn.Parameter:
        base = self._parameters["weight"]
        assert isinstance(base, nn.Parameter)
        return base

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.base_weight
        linear.bias = self.bias
        return linear


class LoRAGroupedExperts(GroupedExperts):
    """`GroupedExperts` (same stacked parameters) plus one low-rank pair per expert and
    projection: `{proj}_lora_A` (E, r, in), `{proj}_lora_B` (E, out, r)."""

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, base: GroupedExperts, rank: int, scaling: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.n_experts = base.n_experts
        self.gate_proj, self.up_proj, self.down_proj = base.gate_proj, base.up_proj, base.down_proj
        for projection in self.PROJECTIONS:
            weight = getattr(base, projection)  # (E, out, in)
            n_experts, out_dim, in_dim = weight.shape
            lora_a = nn.Parameter(weight.new_empty(n_experts, rank, in_dim))
            lora_b = nn.Parameter(weight.new_empty(n_experts, out_dim, rank))
            self.register_parameter(f"{projection}_{LORA_A}", lora_a)
            self.register_parameter(f"{projection}_{LORA_B}", lora_b)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout)

    def pair(self, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{projection}_{LORA_A}"), getattr(self, f"{projection}_{LORA_B}")

    def delta_weight(self, projection: str) -> torch.Tensor:
        """scaling * B_e A_e for every expert e: (E, out, in)."""
        lora_a, lora_b = self.pair(projection)
        return self.scaling * torch.bmm(lora_b, lora_a)

    def forward(
        self,
        x: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        grouped: bool | None = None,
        first_expert: int = 0,
    ) -> torch.Tensor:
        """As `GroupedExperts.forward`, each expert's projections adapted."""
        experts = slice(first_expert, first_expert + tokens_per_expert.numel())
        if grouped is None:
            grouped = use_grouped_mm(x)
        if grouped and not (self.training and self.lora_dropout.p > 0):
            # Grouped GEMM takes whole weights: fold the adapters in (exact without dropout).
            weights = [
                getattr(self, p)[experts] + self.delta_weight(p)[experts] for p in self.PROJECTIONS
            ]
            return self._forward_grouped(x, tokens_per_expert, *weights)
        outputs = []
        rows_per_expert = x.split(tokens_per_expert.tolist())
        for index, rows in enumerate(rows_per_expert):  # rows (count, dim), expert-sorted
            expert = first_expert + index
            gate = self._adapted(rows, "gate_proj", expert)
            up = self._adapted(rows, "up_proj", expert)
            outputs.append(self._adapted(F.silu(gate) * up, "down_proj", expert))
        if not outputs:
            return x.new_zeros(0, self.down_proj.shape[1])
        return torch.cat(outputs)

    def _adapted(self, rows: torch.Tensor, projection: str, expert: int) -> torch.Tensor:
        lora_a, lora_b = self.pair(projection)
        base = F.linear(rows, getattr(self, projection)[expert])
        update = F.linear(F.linear(self.lora_dropout(rows), lora_a[expert]), lora_b[expert])
        return base + self.scaling * update

    def plain(self) -> GroupedExperts:
        n_experts, hidden_dim, dim = self.gate_proj.shape
        with torch.device("meta"):  # its fresh parameters are replaced right away
            experts = GroupedExperts(dim, hidden_dim, n_experts)
        experts.gate_proj, experts.up_proj = self.gate_proj, self.up_proj
        experts.down_proj = self.down_proj
        return experts


def _targets_in(model: Transformer, config: LoRAConfig) -> Iterable[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every module `config.targets` names in `model`."""
    targets = set(config.targets)
    for layer in model.layers:
        assert isinstance(layer, TransformerBlock)
        attention = layer.attention
        for name in ATTENTION_TARGETS:
            if name in targets:
                yield attention, name
        ffn = layer.feed_forward
        mlps: list[nn.Module] = [ffn] if isinstance(ffn, FeedForward) else []
        shared = getattr(ffn, "shared_experts", None)
        if isinstance(shared, FeedForward):
            mlps.append(shared)
        for mlp in mlps:
            for name in MLP_TARGETS:
                if name in targets:
                    yield mlp, name
        experts = getattr(ffn, "experts", None)
        if EXPERTS_TARGET in targets and isinstance(experts, GroupedExperts):
            yield ffn, "experts"
    if HEAD_TARGET in targets:
        yield model, "output"


def apply_lora(model: Transformer, config: LoRAConfig, seed: int = 0) -> Transformer:
    """Add adapters to `model` in place and freeze everything else; returns `model`.

    Apply after the starting weights are loaded and before `deepspeed.initialize` (and before
    any optimizer is built). A target the model does not have (`experts` on a dense model)
    adapts nothing; a config that adapts nothing at all is refused.
    """
    if not config.enabled:
        return model
    if HEAD_TARGET in config.targets and model.output is None:
        raise LoRAConfigError(
            "targets: lm_head is tied to the embeddings (model.tie_embeddings); drop lm_head"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapted = 0
    for parent, name in list(_targets_in(model, config)):
        base = getattr(parent, name)
        module: LoRALinear | LoRAHead | LoRAGroupedExperts
        if isinstance(base, GroupedExperts):
            module = LoRAGroupedExperts(base, config.rank, config.scaling, config.dropout)
            for projection in LoRAGroupedExperts.PROJECTIONS:
                _init_pair(*module.pair(projection), generator)
        elif name == "output":
            module = LoRAHead(base, config.rank, config.scaling)
            _init_pair(module.lora_A, module.lora_B, generator)
        else:
            module = LoRALinear(base, config.rank, config.scaling, config.dropout)
            _init_pair(module.lora_A, module.lora_B, generator)
        module.train(base.training)
        setattr(parent, name, module)
        adapted += 1
    if not adapted:
        raise LoRAConfigError(f"targets: none of {', '.join(config.targets)} exists in this model")
    return model


def _lora_modules(
    model: nn.Module,
) -> list[tuple[nn.Module, str, LoRALinear | LoRAHead | LoRAGroupedExperts]]:
    found: list[tuple[nn.Module, str, LoRALinear | LoRAHead | LoRAGroupedExperts]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, LoRALinear | LoRAHead | LoRAGroupedExperts):
                found.append((parent, name, child))
    return found


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, every adapter of `model` contributes nothing: the model computes its
    base weights' function (LoRA-DPO's reference without a second copy of the model).

    The adapters' scaling is set to 0, so each output is base + 0 * update, bit-equal to
    the base alone; the scalings are restored on exit, also after an exception.
    """
    modules = [module for _, _, module in _lora_modules(model)]
    saved = [module.scaling for module in modules]
    for module in modules:
        module.scaling = 0.0
    try:
        yield
    finally:
        for module, scaling in zip(modules, saved, strict=True):
            module.scaling = scaling


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight in place and restore the plain modules.

    Afterwards the model has exactly the parameter names of a model never adapted (ready for
    `save_model_as_hf`); its weights stay frozen as they were.
    """
    for parent, name, module in _lora_modules(model):
        if isinstance(module, LoRAGroupedExperts):
            for projection in module.PROJECTIONS:
                weight = getattr(module, projection)
                weight.add_(module.delta_weight(projection).to(weight.dtype))
        elif isinstance(module, LoRAHead):
            module.base_weight.add_(module.delta_weight().to(module.base_weight.dtype))
        else:
            assert isinstance(module, LoRALinear)
            module.weight.add_(module.delta_weight().to(module.weight.dtype))
        setattr(parent, name, module.plain())
    return model


def is_adapter_name(name: str) -> bool:
    """Whether a state-dict name is an adapter matrix (`...q_proj.lora_A`, `...up_proj_lora_B`)."""
    return name.endswith((f".{LORA_A}", f".{LORA_B}", f"_{LORA_A}", f"_{LORA_B}"))


def adapter_base_name(name: str) -> str:
    """The base weight an adapter name belongs to: `x.q_proj.lora_A` -> `x.q_proj.weight`,
    `x.experts.up_proj_lora_B` -> `x.experts.up_proj`."""
    for suffix in (LORA_A, LORA_B):
        if name.endswith(f".{suffix}"):
            return name.removesuffix(f".{suffix}") + ".weight"
        if name.endswith(f"_{suffix}"):
            return name.removesuffix(f"_{suffix}")
    raise KeyError(name)


def adapter_pairs(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """{base weight name: (lora_A name, lora_B name)} for every adapter in a state dict."""
    pairs: dict[str, tuple[str, str]] = {}
    for name in state_dict:
        if name.endswith(LORA_A):
            b_name = name.removesuffix(LORA_A) + LORA_B
            if b_name not in state_dict:
                raise KeyError(f"{b_name}: missing (its {LORA_A} is present)")
            pairs[adapter_base_name(name)] = (name, b_name)
    return pairs


@torch.no_grad()
def merged_state_dict(
    state_dict: dict[str, torch.Tensor], config: LoRAConfig
) -> dict[str, torch.Tensor]:
    """A full (consolidated) state dict with adapters folded in and adapter names dropped.

    Base tensors are not modified; each merged one is a new tensor in the base dtype, computed
    in fp32. A state dict without adapters comes back unchanged (a shallow copy).
    """
    pairs = adapter_pairs(state_dict)
    merged = {name: tensor for name, tensor in state_dict.items() if not is_adapter_name(name)}
    for base_name, (a_name, b_name) in pairs.items():
        if base_name not in merged:
            raise KeyError(f"{base_name}: missing (adapter {a_name} has no base weight)")
        base = merged[base_name]
        lora_a, lora_b = state_dict[a_name].float(), state_dict[b_name].float()
        delta = config.scaling * (lora_b @ lora_a)  # (out, in) or (E, out, in)
        merged[base_name] = (base.float() + delta).to(base.dtype)
    return merged


def trainable_parameter_count(model: nn.Module) -> int:
    """Parameters that get gradients and optimizer state."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_counts(model_config: ModelConfig, config: LoRAConfig) -> tuple[int, int]:
    """(total, trainable) parameter counts of `model_config` with `config` applied, computed on
    the meta device (no memory, any size). rank 0: every parameter is trainable."""
    model = build_model(model_config, "meta")
    apply_lora(model, config)
    total = sum(p.numel() for p in model.parameters())
    return total, trainable_parameter_count(model)


def _numel(param: torch.Tensor) -> int:
    """A parameter's whole size, also when ZeRO-3 holds only a partition of it."""
    return int(getattr(param, "ds_numel", param.numel()))


def adapter_params_per_token(
    model: nn.Module, config: ModelConfig, output_head: bool = True
) -> int | None:
    """The adapter parameters one token passes through: every q/k/v/o, gate/up/down and head
    pair (not the head's when `output_head` is False: a reward model never projects to the
    vocabulary), and of an MoE layer's expert pairs the `top_k` of `n_experts` it is routed
    to; None when `model` has no adapters (every weight trains)."""
    modules = [module for _, _, module in _lora_modules(model)]
    if not modules:
        return None
    total = 0
    for module in modules:
        if isinstance(module, LoRAHead) and not output_head:
            continue
        if isinstance(module, LoRAGroupedExperts):
            for projection in module.PROJECTIONS:
                pair = sum(_numel(t) for t in module.pair(projection))
                total += pair // config.n_experts * config.top_k
        else:
            total += _numel(module.lora_A) + _numel(module.lora_B)
    return total


def trained_flops_per_token(
    model: nn.Module, config: ModelConfig, seq_len: int, output_head: bool = True
) -> float:
    """Training FLOPs per token of `model` as it is set up: 6N + attention, or with LoRA
    adapters the frozen base's 4N + 6 per adapter parameter + attention (model.flops)."""
    return flops_per_token(
        config,
        seq_len,
        adapter_params=adapter_params_per_token(model, config, output_head),
        output_head=output_head,
    )


class TrainedFlops:
    """`trained_flops_per_token` of the model an objective trains, found once per model: its
    adapters do not change while it trains, so no micro-batch walks its modules again."""

    def __init__(self, seq_len: int, output_head: bool = True) -> None:
        self.seq_len = seq_len
        self.output_head = output_head
        self._model: nn.Module | None = None
        self._per_token = 0.0

    def __call__(self, model: nn.Module, config: ModelConfig) -> float:
        if model is not self._model:
            self._model = model
            self._per_token = trained_flops_per_token(model, config, self.seq_len, self.output_head)
        return self._per_token


def adam_state_bytes(n_trainable: int, fp32_master: bool = True) -> int:
    """Optimizer-state bytes of AdamW for `n_trainable` parameters: two fp32 moments (8 B), plus
    an fp32 master copy (4 B) in mixed precision and under DeepSpeed ZeRO >= 1."""
    return n_trainable * (12 if fp32_master else 8)
