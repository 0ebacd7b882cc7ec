"""Moving weights between an HF folder and our model, checked name by name and shape by shape."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from model.config import ModelConfig
from model.hf.families import HFFamily, HFFormatError, family_for
from model.hf.folder import CONFIG_FILE, HFFolder, write_safetensors_shards
from model.hf.state_dict import hf_expert_slot, hf_to_ours_name, ours_to_hf_names
from model.transformer import Transformer, build_model


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes for `config` (built on the meta device: no memory)."""
    return {name: p.shape for name, p in build_model(config, "meta").state_dict().items()}


def iter_converted(folder: HFFolder, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for every weight of `folder`, one at a time, checked against `config`.

    Raises HFFormatError for an unknown tensor, a wrong shape, or (at the end) missing weights.
    A tied model ignores a stored `lm_head.weight` (some exporters write the shared matrix).
    """
    shapes = expected_shapes(config)
    seen: set[str] = set()
    # Per-expert HF tensors gathered until all E are in, then stacked into our one tensor.
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, tensor in folder.tensors():
        slot = hf_expert_slot(hf_name)
        if slot is not None:
            name, expert = slot
            if name not in shapes or expert >= shapes[name][0]:
                raise HFFormatError(
                    f"{folder.folder}: tensor {hf_name!r} is not used by this config"
                )
            experts = pending.setdefault(name, {})
            experts[expert] = tensor
            if len(experts) < shapes[name][0]:
                continue
            tensor = torch.stack([experts[e] for e in range(len(experts))])
            del pending[name]
        else:
            try:
                our_name = hf_to_ours_name(hf_name)
            except KeyError:
                raise HFFormatError(
                    f"{folder.folder}: tensor {hf_name!r} has no place in a "
                    f"{folder.family.architecture} model of this config"
                ) from None
            if our_name is None or (our_name == "output.weight" and config.tie_embeddings):
                continue
            name = our_name
            if name not in shapes:
                raise HFFormatError(
                    f"{folder.folder}: tensor {hf_name!r} is not used by this config"
                )
        if tensor.shape != shapes[name]:
            raise HFFormatError(
                f"{folder.folder}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(shapes[name])}"
            )
        seen.add(name)
        yield name, tensor
    missing = sorted(set(shapes) - seen)
    if missing:
        raise HFFormatError(
            f"{folder.folder}: {len(missing)} weights missing, e.g. {missing[0]!r} (ours)"
        )


@torch.no_grad()
def load_hf_into_model(model: Transformer, folder: HFFolder) -> None:
    """Copy every weight of `folder` into `model` in place (casting to the model's dtype)."""
    params = model.state_dict()
    for name, tensor in iter_converted(folder, model.config):
        params[name].copy_(tensor)


def load_hf_model(folder: HFFolder, device: str = "cpu") -> Transformer:
    """Our model with the weights of an HF folder, in fp32, in eval mode."""
    model = build_model(folder.model_config(), "meta")
    model.to_empty(device=device)
    load_hf_into_model(model, folder)
    model.init_rope()
    return model.float().eval()


DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # the shard size `transformers` uses by default


def write_hf_weights(
    out: Path,
    config: ModelConfig,
    family: HFFamily,
    numels: Sequence[tuple[str, int]],
    load: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write config.json and safetensors for our weights (names and element counts in `numels`).

    `load(name)` returns one of our tensors; each is renamed to `family`'s name and cast to
    `dtype` only when its shard is written. Returns the files written.
    """
    out.mkdir(parents=True, exist_ok=True)
    hf_config = family.to_hf_config(config, str(dtype).removeprefix("torch."))
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    # Stacked experts become one HF tensor per expert: (our name, expert index or None).
    to_ours: dict[str, tuple[str, int | None]] = {}
    sizes: list[tuple[str, int]] = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, numel in numels:
        hf_names = ours_to_hf_names(name, config.n_experts, family.moe_style)
        for hf_name, expert in hf_names:
            to_ours[hf_name] = (name, expert)
            sizes.append((hf_name, numel // len(hf_names) * itemsize))
    last: list[tuple[str, torch.Tensor]] = []  # the experts of one tensor are written in a row

    def load_hf(hf_name: str) -> torch.Tensor:
        name, expert = to_ours[hf_name]
        if expert is None:
            return load(name).to(dtype).contiguous()
        if not last or last[0][0] != name:
            last[:] = [(name, load(name))]
        return last[0][1][expert].to(dtype).contiguous()

    files = write_safetensors_shards(out, sizes, load_hf, max_shard_bytes)
    return [CONFIG_FILE, *files]


def save_model_as_hf(
    model: Transformer,
    out: str | Path,
    architecture: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> HFFamily:
    """Write an in-memory model as an HF folder (weights + config.json); return the family."""
    family = family_for(model.config, architecture)
    state = model.state_dict()
    write_hf_weights(
        Path(out),
        model.config,
        family,
        [(name, tensor.numel()) for name, tensor in state.items()],
        lambda name: state[name].detach().cpu(),
        dtype or next(model.parameters()).dtype,
        max_shard_bytes,
    )
    return family
