"""`scaletrain merge`: combine fine-tuned models of one architecture, tensor by tensor.

Methods (theta_i the inputs, w_i their weights, base the common ancestor, tau_i = theta_i - base):
    linear           sum_i w_i theta_i / sum_i w_i
    task_arithmetic  base + sum_i w_i tau_i
    ties             trim each tau_i to its top `density` fraction by magnitude, elect a sign per
                     entry = sign(sum_i w_i trim(tau_i)), then base + the disjoint mean: the sum of
                     the w_i trim(tau_i) agreeing with the elected sign over their count
    dare             drop each entry of tau_i with probability p, rescale the rest by 1/(1-p),
                     then task arithmetic (`drop_prob` with `ties` gives DARE-TIES)
    slerp            two models: spherical interpolation at t of each tensor, linear when the
                     two are (nearly) colinear
Stacked MoE expert tensors (E, ...) are trimmed and interpolated expert by expert. A tied model
has no output.weight, so tied and untied inputs are refused and the invariant holds.

Memory: inputs are read with `safe_open` one tensor at a time (each file opened only for the
tensor being read, so no input stays mapped), merged in float64 and appended to the output
file at once; the peak is a few copies of the largest tensor, never a whole model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from data_pipeline.tokenizer import Tokenizer
from model.config import NETWORK_FIELDS
from model.hf import HFFolder
from model.hf.state_dict import ours_to_hf_names
from model.hf.weights import expected_shapes
from model.lora import is_adapter_name, merged_state_dict
from trainer.checkpointing import checkpoint as ckpt
from trainer.config import JobConfig, load_job_config, write_config
from trainer.config_io import ConfigError, load_yaml

logger = logging.getLogger(__name__)

METHODS = ("linear", "task_arithmetic", "ties", "dare", "slerp")
DELTA_METHODS = ("task_arithmetic", "ties", "dare")
FORMATS = ("checkpoint", "hf")
HF_PREFIX = "hf:"
WEIGHTS_FILE = "model.safetensors"
# Inputs must agree on every network field, and on how positions run through packed documents.
ARCHITECTURE_FIELDS = (
    *(attribute for attribute, _ in NETWORK_FIELDS),
    "reset_positions_per_document",
)
# Colinearity threshold of slerp: above it sin(theta) is too small to divide by.
SLERP_COLINEAR = 1.0 - 1e-6
_EXPERTS = ".feed_forward.experts."


# ---------------------------------------------------------------------------- recipe
@dataclass
class TensorOverride:
    """Weights (or slerp's t, or ties' density) for the tensors whose name matches `pattern`
    (an fnmatch glob on our names, e.g. "layers.*.attention.*"); the first match wins."""

    pattern: str
    weights: list[float] | None = None
    t: float | None = None
    density: float | None = None


@dataclass
class MergeRecipe:
    """One merge: the CLI's options or a RECIPE.yaml with the same keys plus `tensors`."""

    method: str
    models: list[str]
    out: str
    weights: list[float] | None = None
    base: str | None = None
    density: float = 1.0
    drop_prob: float | None = None
    t: float = 0.5
    seed: int = 0
    format: str = "checkpoint"
    tensors: list[TensorOverride] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ConfigError naming the first option that cannot work."""
        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.format not in FORMATS:
            raise ConfigError(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.models:
            raise ConfigError("models: at least one model is needed")
        if self.method == "slerp" and len(self.models) != 2:
            raise ConfigError(f"models: slerp takes exactly 2 models, got {len(self.models)}")
        if self.method in DELTA_METHODS and self.base is None:
            raise ConfigError(f"base: {self.method} needs --base (the models' common ancestor)")
        if self.method in ("linear", "slerp") and self.base is not None:
            raise ConfigError(f"base: {self.method} takes no base model")
        if self.method == "linear" and len(self.models) < 2:
            raise ConfigError("models: linear needs at least 2 models")
        if self.method != "ties" and (
            self.density != 1.0 or any(o.density is not None for o in self.tensors)
        ):
            raise ConfigError(f"density: trimming is part of ties, not of {self.method}")
        if self.drop_prob is not None and self.method not in DELTA_METHODS:
            raise ConfigError(f"drop_prob: DARE applies to task vectors, not to {self.method}")
        if self.drop_prob is not None and not 0.0 <= self.drop_prob < 1.0:
            raise ConfigError(f"drop_prob: must be in [0, 1), got {self.drop_prob}")
        for override in [None, *self.tensors]:
            where = "" if override is None else f"tensors[{override.pattern!r}]."
            weights = self.weights if override is None else override.weights
            density = self.density if override is None else override.density
            t = self.t if override is None else override.t
            if weights is not None and len(weights) != len(self.models):
                raise ConfigError(
                    f"{where}weights: {len(weights)} weights for {len(self.models)} models"
                )
            if weights is not None and self.method == "linear" and sum(weights) == 0:
                raise ConfigError(f"{where}weights: linear weights must not sum to 0")
            if density is not None and not 0.0 < density <= 1.0:
                raise ConfigError(f"{where}density: must be in (0, 1], got {density}")
            if t is not None and not 0.0 <= t <= 1.0:
                raise ConfigError(f"{where}t: must be in [0, 1], got {t}")

    def options_for(self, name: str) -> tuple[list[float], float, float]:
        """(weights, density, t) for tensor `name`: the first matching override, else global."""
        default_weights = {"linear": 1.0 / len(self.models)}.get(self.method, 1.0)
        weights = self.weights or [default_weights] * len(self.models)
        density, t = self.density, self.t
        for override in self.tensors:
            if fnmatch.fnmatchcase(name, override.pattern):
                weights = override.weights if override.weights is not None else weights
                density = override.density if override.density is not None else density
                t = override.t if override.t is not None else t
                break
        return list(weights), density, t


def load_recipe(path: str | Path, out: str | None = None) -> MergeRecipe:
    """A MergeRecipe from a YAML file (keys as the CLI options, with drop_prob for --drop-prob,
    plus `tensors: [{pattern, weights | t | density}]`); `out` overrides the file's."""
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a merge recipe is a mapping of keys")
    known = {f.name for f in fields(MergeRecipe)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    raw = dict(raw)
    if out is not None:
        raw["out"] = out
    for key in ("method", "models", "out"):
        if key not in raw:
            raise ConfigError(f"{path}: {key!r} is required")
    overrides = []
    override_keys = {f.name for f in fields(TensorOverride)}
    for i, entry in enumerate(raw.pop("tensors", None) or []):
        if not isinstance(entry, dict) or "pattern" not in entry:
            raise ConfigError(f"{path}: tensors[{i}] needs a 'pattern'")
        unknown = set(entry) - override_keys
        if unknown:
            raise ConfigError(f"{path}: tensors[{i}]: unknown key {sorted(unknown)[0]!r}")
        overrides.append(TensorOverride(**entry))
    if not isinstance(raw["models"], list):
        raise ConfigError(f"{path}: models must be a list of checkpoints")
    try:
        recipe = MergeRecipe(**raw, tensors=overrides)
        recipe.models = [str(m) for m in recipe.models]
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return recipe


# ---------------------------------------------------------------------------- tensor math
def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i."""
    total = sum(w * x.double() for w, x in zip(weights, tensors, strict=True))
    assert isinstance(total, torch.Tensor)
    return total / sum(weights)


def task_arithmetic(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """base + sum_i w_i delta_i."""
    result = base.double().clone()
    for w, delta in zip(weights, deltas, strict=True):
        result += w * delta.double()
    return result


def trim(delta: torch.Tensor, density: float, groups: int = 1) -> torch.Tensor:
    """Keep the round(density * n) largest-magnitude entries of each of `groups` equal slices
    along dim 0 (one per MoE expert; 1 = the whole tensor), zero the rest."""
    if density >= 1.0:
        return delta
    rows = delta.reshape(groups, -1)
    k = max(1, round(density * rows.shape[1]))
    kept = torch.zeros_like(rows)
    index = rows.abs().topk(k, dim=1).indices
    kept.scatter_(1, index, rows.gather(1, index))
    return kept.reshape(delta.shape)


def ties(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    groups: int = 1,
) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint mean; see the module doc."""
    trimmed = [w * trim(d.double(), density, groups) for w, d in zip(weights, deltas, strict=True)]
    sign = torch.sign(sum(trimmed))  # type: ignore[arg-type]
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for delta in trimmed:
        agrees = (torch.sign(delta) == sign) & (delta != 0)
        total += torch.where(agrees, delta, 0.0)
        count += agrees
    return base.double() + total / count.clamp(min=1)


def dare_seed(seed: int, name: str, model_index: int) -> int:
    """The generator seed of one tensor of one model: the same on every run and machine."""
    digest = hashlib.sha256(f"{seed}:{model_index}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare(delta: torch.Tensor, drop_prob: float, seed: int) -> torch.Tensor:
    """Drop each entry with probability p, scale the kept ones by 1/(1-p) (Yu et al., 2023)."""
    if drop_prob == 0.0:
        return delta
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=generator) >= drop_prob
    return torch.where(keep, delta.double() / (1.0 - drop_prob), 0.0)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, groups: int = 1) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1), per slice along dim 0 (`groups`).

    The angle is measured between the normalised slices, the interpolation applies to the
    slices themselves; nearly colinear (or zero) slices are interpolated linearly.
    """
    rows_a, rows_b = a.double().reshape(groups, -1), b.double().reshape(groups, -1)
    out = torch.empty_like(rows_a)
    for i in range(groups):
        x, y = rows_a[i], rows_b[i]
        norms = x.norm() * y.norm()
        cos = float((x @ y) / norms) if norms > 0 else 1.0
        if abs(cos) > SLERP_COLINEAR:
            out[i] = (1.0 - t) * x + t * y
            continue
        theta = math.acos(cos)
        sin_theta = math.sin(theta)
        out[i] = math.sin((1.0 - t) * theta) / sin_theta * x + math.sin(t * theta) / sin_theta * y
    return out.reshape(a.shape)


def expert_groups(name: str, shape: Sequence[int]) -> int:
    """How many independent slices along dim 0 a tensor has: E for stacked MoE experts."""
    return int(shape[0]) if _EXPERTS in f".{name}" else 1


def merge_tensor(
    recipe: MergeRecipe,
    name: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
) -> torch.Tensor:
    """One merged tensor (float64) of `recipe` from the inputs' tensors named `name`."""
    weights, density, t = recipe.options_for(name)
    groups = expert_groups(name, tensors[0].shape)
    if recipe.method == "linear":
        return linear(tensors, weights)
    if recipe.method == "slerp":
        return slerp(tensors[0], tensors[1], t, groups)
    assert base is not None
    deltas = [x.double() - base.double() for x in tensors]
    drop_prob = recipe.drop_prob
    if drop_prob is None and recipe.method == "dare":
        drop_prob = 0.5
    if drop_prob:
        deltas = [dare(d, drop_prob, dare_seed(recipe.seed, name, i)) for i, d in enumerate(deltas)]
    if recipe.method == "ties":
        return ties(base, deltas, weights, density, groups)
    return task_arithmetic(base, deltas, weights)


# ---------------------------------------------------------------------------- inputs
def fold_lora_adapters(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA run's checkpoint as plain weights: every adapter folded into its base weight
    (scaling from the checkpoint's own `lora` section), so LoRA fine-tunes merge like any other."""
    from trainer.inference import checkpoint_lora_config

    lora = checkpoint_lora_config(folder)
    if lora is None:
        adapter = next(name for name in state if is_adapter_name(name))
        raise ckpt.CheckpointError(
            f"{folder}: holds LoRA adapter tensors ({adapter!r}) but its config.yaml has no "
            "lora section"
        )
    return merged_state_dict(state, lora)


class WeightSource:
    """One input: its model config, tokenizer and tensors, read one at a time by name."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.job_config: JobConfig | None = None
        self.tokenizer: Tokenizer | None = None
        self._folded: dict[str, torch.Tensor] | None = None
        # name -> [(file, stored name, expert index or None)]
        self._locations: dict[str, list[tuple[Path, str, int | None]]] = {}
        if spec.startswith(HF_PREFIX):
            self._open_hf(spec.removeprefix(HF_PREFIX))
        else:
            self._open_checkpoint(spec)

    def _open_checkpoint(self, spec: str) -> None:
        from trainer.inference import resolve_checkpoint

        folder = resolve_checkpoint(spec)
        ckpt.verify_checkpoint(folder)
        self.folder = folder
        self.job_config = load_job_config(folder / "config.yaml", ignore_unknown_sections=True)
        self.model_config = self.job_config.model
        self.tokenizer = Tokenizer.load(folder) if Tokenizer.found_in(folder) else None
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ckpt.CheckpointError(f"{weights}: missing")
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
        self._locations = {name: [(weights, name, None)] for name in names}
        if any(is_adapter_name(name) for name in names):
            state = {name: self._read(name) for name in names}
            self._folded = fold_lora_adapters(folder, state)
            self._locations = {name: [] for name in self._folded}

    def _open_hf(self, directory: str) -> None:
        folder = HFFolder(directory)
        self.folder = folder.folder
        self.model_config = folder.model_config()
        self.tokenizer = (
            Tokenizer.load(folder.folder) if Tokenizer.found_in(folder.folder) else None
        )
        stored: dict[str, Path] = {}
        for path in folder.weight_files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                stored.update({name: path for name in handle.keys()})  # noqa: SIM118
        style = folder.family.moe_style if folder.family.moe_style != "none" else "qwen_moe"
        for name in expected_shapes(self.model_config):
            places = []
            for hf_name, expert in ours_to_hf_names(name, self.model_config.n_experts, style):
                if hf_name not in stored:
                    raise ckpt.CheckpointError(f"{directory}: tensor {hf_name!r} missing")
                places.append((stored[hf_name], hf_name, expert))
            self._locations[name] = places

    @property
    def names(self) -> list[str]:
        return list(self._locations)

    def _read(self, name: str) -> torch.Tensor:
        parts = []
        for path, stored_name, _ in self._locations[name]:
            # Opened per tensor: a file kept open stays mapped, and every page read would stay
            # in this process's resident memory until the end of the merge.
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                parts.append(handle.get_tensor(stored_name))
        return parts[0] if len(parts) == 1 else torch.stack(parts)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._folded is not None:
            return tuple(self._folded[name].shape)
        path, stored_name, _ = self._locations[name][0]
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shape = tuple(handle.get_slice(stored_name).get_shape())
        return (len(self._locations[name]), *shape) if len(self._locations[name]) > 1 else shape

    def dtype(self, name: str) -> torch.dtype:
        if self._folded is not None:
            return self._folded[name].dtype
        path, stored_name, _ = self._locations[name][0]
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = handle.get_slice(stored_name).get_dtype()
        return _DTYPES_BY_NAME[stored]

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` (our naming; MoE experts stacked)."""
        if self._folded is not None:
            return self._folded[name]
        return self._read(name)


def check_compatible(sources: Sequence[WeightSource]) -> None:
    """Refuse inputs that differ, naming the first difference: architecture, tokenizer
    vocabulary, tensor names, then shapes (CheckpointError)."""
    first = sources[0]
    for other in sources[1:]:
        for key in ARCHITECTURE_FIELDS:
            mine, theirs = getattr(first.model_config, key), getattr(other.model_config, key)
            if mine != theirs:
                raise ckpt.CheckpointError(
                    f"architectures differ: model.{key} is {mine!r} in {first.spec} "
                    f"but {theirs!r} in {other.spec}"
                )
    for other in sources[1:]:
        _check_tokenizers(first, other)
    names = first.names
    for other in sources[1:]:
        for mine, theirs, label in (
            (names, other.names, other.spec),
            (other.names, names, first.spec),
        ):
            missing = [n for n in mine if n not in set(theirs)]
            if missing:
                raise ckpt.CheckpointError(
                    f"tensor names differ: {missing[0]!r} missing in {label}"
                )
    for name in names:
        shape = first.shape(name)
        for other in sources[1:]:
            if other.shape(name) != shape:
                raise ckpt.CheckpointError(
                    f"shapes differ: {name} is {list(shape)} in {first.spec} "
                    f"but {list(other.shape(name))} in {other.spec}"
                )


def _check_tokenizers(first: WeightSource, other: WeightSource) -> None:
    for source in (first, other):
        if source.tokenizer is None:
            raise ckpt.CheckpointError(
                f"{source.spec}: no tokenizer (a merged checkpoint needs the inputs' tokenizer)"
            )
    a, b = first.tokenizer, other.tokenizer
    assert a is not None and b is not None
    if a.sha256 == b.sha256:
        return
    if a.vocab_size != b.vocab_size:
        raise ckpt.CheckpointError(
            f"tokenizers differ: vocabulary of {a.vocab_size} in {first.spec} "
            f"but {b.vocab_size} in {other.spec}"
        )
    for token_id in range(a.vocab_size):
        if a.id_to_token(token_id) != b.id_to_token(token_id):
            raise ckpt.CheckpointError(
                f"tokenizers differ: id {token_id} is {a.id_to_token(token_id)!r} in "
                f"{first.spec} but {b.id_to_token(token_id)!r} in {other.spec}"
            )
    for special in ("bos_id", "eos_id", "pad_id"):
        if getattr(a, special) != getattr(b, special):
            raise ckpt.CheckpointError(
                f"tokenizers differ: {special} {getattr(a, special)} in {first.spec} "
                f"but {getattr(b, special)} in {other.spec}"
            )
    logger.info("tokenizer files differ but vocabularies match: %s, %s", first.spec, other.spec)


# ---------------------------------------------------------------------------- output
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


class StreamingSafetensorsWriter:
    """Write one safetensors file tensor by tensor, in the layout of the format's spec.

    The `safetensors` library saves only a complete dict of tensors; this writes the header
    first (every name, dtype and shape is known before merging starts), then each tensor's
    bytes as it is produced, so the merged model is never whole in memory. The file is read
    back by the `safetensors` library itself.
    """

    def __init__(self, path: Path, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            self._expected.append((name, dtype, tuple(shape)))
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the spec allows padding; readers align to 8
        self._handle: BinaryIO = path.open("wb")
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; names, dtypes and shapes must come in the header's order."""
        expected = self._expected[self._next]
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != expected:
            raise ValueError(f"tensor {got} written where the header has {expected}")
        self._handle.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise ValueError(f"{len(self._expected) - self._next} tensors were not written")
        self._handle.flush()
        self._handle.close()


def _merged_tensors(
    recipe: MergeRecipe, models: Sequence[WeightSource], base: WeightSource | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for name in models[0].names:
        tensors = [m.get(name) for m in models]
        base_tensor = base.get(name) if base is not None else None
        if not tensors[0].is_floating_point():
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise ckpt.CheckpointError(f"{name}: integer tensors differ between the inputs")
            yield name, tensors[0]
            continue
        merged = merge_tensor(recipe, name, tensors, base_tensor)
        yield name, merged.to(tensors[0].dtype)


def run_merge(recipe: MergeRecipe) -> Path:
    """Merge `recipe.models` into `recipe.out` (a checkpoint, or an HF folder); return it.

    The output is written under a temporary name beside `out` and renamed when complete;
    an existing non-empty `out` is refused.
    """
    recipe.validate()
    out = Path(recipe.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ckpt.CheckpointError(f"{out}: exists and is not empty")
    models = [WeightSource(spec) for spec in recipe.models]
    base = WeightSource(recipe.base) if recipe.base is not None else None
    check_compatible([*models, *([base] if base is not None else [])])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{ckpt.TMP_PREFIX}{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    checkpoint_dir = tmp if recipe.format == "checkpoint" else tmp.with_name(tmp.name + "-ckpt")
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    try:
        _write_checkpoint(recipe, models, base, checkpoint_dir, out)
        if recipe.format == "hf":
            from trainer.hf_checkpoint import export_checkpoint

            export_checkpoint(checkpoint_dir, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        for leftover in {tmp, checkpoint_dir}:
            if leftover.exists():
                shutil.rmtree(leftover)
    logger.info("merged %d models (%s) into %s", len(models), recipe.method, out)
    return out


def _write_checkpoint(
    recipe: MergeRecipe,
    models: Sequence[WeightSource],
    base: WeightSource | None,
    folder: Path,
    final: Path,
) -> None:
    folder.mkdir(parents=True)
    first = models[0]
    specs = [(name, first.dtype(name), first.shape(name)) for name in first.names]
    writer = StreamingSafetensorsWriter(folder / WEIGHTS_FILE, specs)
    for name, tensor in _merged_tensors(recipe, models, base):
        writer.write(name, tensor)
        del tensor
    writer.close()
    tokenizer = first.tokenizer
    assert tokenizer is not None  # check_compatible refused inputs without one
    tokenizer.save(folder)
    job = _job_config(first, final, tokenizer)
    write_config(job, folder / "config.yaml")
    provenance = {
        "method": recipe.method,
        "models": recipe.models,
        "base": recipe.base,
        "weights": recipe.weights,
        "density": recipe.density,
        "drop_prob": recipe.drop_prob,
        "t": recipe.t,
        "seed": recipe.seed,
        "tensors": [vars(o) for o in recipe.tensors],
    }
    state = {"step": 0, "tokens_seen": 0, "merged": provenance}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))
    ckpt.write_manifest(
        folder,
        {
            "step": 0,
            "source": "merge",
            "merge": provenance,
            "tokenizer_sha256": tokenizer.sha256,
            "versions": {"torch": torch.__version__},
        },
    )


def _job_config(source: WeightSource, final: Path, tokenizer: Tokenizer) -> JobConfig:
    """The first input's job config (an HF input gets a fresh one) with the merged model's own
    tokenizer and no init_from: the checkpoint defines its network by itself."""
    if source.job_config is not None:
        job = source.job_config
    else:
        job = JobConfig()
        job.model = source.model_config
        job.data.seq_len = min(job.data.seq_len, source.model_config.max_seq_len)
        job.train.global_batch_tokens = job.data.seq_len * max(
            1, job.train.global_batch_tokens // job.data.seq_len
        )
    job.model.init_from = None
    job.tokenizer.path = str(final.resolve() / tokenizer.main_file)
    return job
