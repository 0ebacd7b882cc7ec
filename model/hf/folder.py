"""Reading and writing Hugging Face model folders: config.json plus (sharded) safetensors.

Reading is lazy: `HFFolder.tensors()` opens each shard with `safe_open` and yields one tensor
at a time, so converting never holds two copies of the weights. Writing plans shards from
sizes alone, then loads, saves and drops one shard's tensors at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.hf.families import HFFamily, HFFormatError, family_of

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFFolder:
    """A local Hugging Face model folder: its config, family and lazily read tensors."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        config_path = self.folder / CONFIG_FILE
        if not config_path.is_file():
            raise HFFormatError(f"{config_path}: missing (not a Hugging Face model folder)")
        try:
            self.hf_config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise HFFormatError(f"{config_path}: not valid JSON ({exc})") from None
        self.family: HFFamily = family_of(self.hf_config, str(config_path))
        self.weight_files = self._weight_files()

    def _weight_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = [self.folder / name for name in dict.fromkeys(weight_map.values())]
        elif (self.folder / WEIGHTS_FILE).is_file():
            files = [self.folder / WEIGHTS_FILE]
        else:
            legacy = sorted(p.name for p in self.folder.glob("pytorch_model*.bin"))
            hint = f" (found {legacy[0]}: convert it to safetensors first)" if legacy else ""
            raise HFFormatError(f"{self.folder / WEIGHTS_FILE}: missing{hint}")
        for path in files:
            if not path.is_file():
                raise HFFormatError(f"{path}: missing (listed in {INDEX_FILE})")
        return files

    def model_config(self) -> ModelConfig:
        """Our ModelConfig for this folder."""
        return self.family.from_hf_config(self.hf_config, str(self.folder / CONFIG_FILE))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every stored tensor, read one at a time."""
        for path in self.weight_files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, handle.get_tensor(name)


def write_safetensors_shards(
    folder: Path,
    sizes: Sequence[tuple[str, int]],
    load: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
) -> list[str]:
    """Write tensors named in `sizes` (name, bytes) as safetensors; return the files written.

    One `model.safetensors` when everything fits in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`, the layout
    `transformers` writes (a tensor larger than the limit gets a shard of its own).
    """
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, nbytes in sizes:
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file({name: load(name) for name in shards[0]}, folder / WEIGHTS_FILE, metadata)
        return [WEIGHTS_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file_name, names in zip(files, shards, strict=True):
        save_file({name: load(name) for name in names}, folder / file_name, metadata)
    index = {
        "metadata": {"total_size": sum(nbytes for _, nbytes in sizes)},
        "weight_map": {
            name: file_name
            for file_name, names in zip(files, shards, strict=True)
            for name in names
        },
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return [*files, INDEX_FILE]
