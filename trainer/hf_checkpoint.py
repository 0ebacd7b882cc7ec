"""Scaletrain checkpoints <-> Hugging Face folders (`scaletrain export` / `import`, `hf:DIR`).

The weight and config conversion lives in `model.hf`; this module adds what belongs to a
checkpoint or a release: the tokenizer files, generation_config.json, config.yaml, the
manifest. Export reads model.safetensors lazily, so a checkpoint larger than memory exports.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer
from model.config import ModelConfig
from model.hf import DEFAULT_MAX_SHARD_BYTES, HFFolder, family_for, write_hf_weights
from model.hf.weights import iter_converted, load_hf_into_model
from model.transformer import Transformer
from trainer import checkpoint as ckpt
from trainer.config import JobConfig, load_job_config, write_config
from trainer.config_io import ConfigError

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields that decide the numbers a model computes; init_from must agree on all of them.
_SHAPE_FIELDS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_dim",
    "norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_embeddings",
    "qk_norm",
    "attention_bias",
    "attention_out_bias",
    "sliding_window",
)


# ---------------------------------------------------------------------------- export
def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    architecture: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a verified scaletrain checkpoint as an HF folder; return the folder.

    The folder holds config.json, (sharded) safetensors, generation_config.json and the
    tokenizer: tokenizer.model plus a tokenizer_config.json naming LlamaTokenizer with our
    bos/eos/pad pieces. `dtype` None keeps the checkpoint's own.
    """
    from trainer.inference import resolve_checkpoint  # data loaders are not needed otherwise

    folder = resolve_checkpoint(checkpoint)
    ckpt.verify_checkpoint(folder)
    config = load_job_config(folder / "config.yaml")
    family = family_for(config.model, architecture)
    weights = folder / "model.safetensors"
    out = Path(out)
    with safe_open(str(weights), framework="pt", device="cpu") as handle:
        names = list(handle.keys())
        numels = [(name, handle.get_slice(name).get_shape()) for name in names]
        stored = {handle.get_slice(name).get_dtype() for name in names}
        if dtype is None:
            dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
                sorted(stored)[0], "float32"
            )
        if dtype not in DTYPES:
            raise ckpt.CheckpointError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        write_hf_weights(
            out,
            config.model,
            family,
            [(name, _numel(shape)) for name, shape in numels],
            handle.get_tensor,
            DTYPES[dtype],
            max_shard_bytes,
        )
    tokenizer = Tokenizer.load(folder)
    write_tokenizer_files(tokenizer, out, config.model.max_seq_len)
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": _optional_id(tokenizer.pad_id),
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    hf_config = json.loads((out / "config.json").read_text())
    hf_config.update(generation)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    logger.info("exported %s as %s to %s", folder, family.architecture, out)
    return out


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _optional_id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None  # sentencepiece says -1 for "none"


def write_tokenizer_files(tokenizer: Tokenizer, out: Path, max_seq_len: int) -> None:
    """tokenizer.model plus the JSON that lets AutoTokenizer build a LlamaTokenizer from it.

    Our encode adds no BOS/EOS, so neither does the HF tokenizer. No tokenizer.json is
    written: producing one needs the `tokenizers` converters, which are not a runtime
    dependency; `transformers` converts tokenizer.model itself when loading.
    """
    tokenizer.save(out)
    piece = tokenizer.processor.IdToPiece
    special = {
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.processor.unk_id()),
    }
    if tokenizer.pad_id >= 0:
        special["pad_token"] = piece(tokenizer.pad_id)
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        # Our sentencepiece model is trained with add_dummy_prefix=False.
        "add_prefix_space": False,
    }
    (out / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------------------- import
def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert an HF folder into a scaletrain checkpoint folder; return it.

    The checkpoint (model.safetensors, config.yaml, tokenizer, trainer_state.json, manifest)
    loads with `trainer.inference.load_checkpoint_model` and works as `model.init_from`.
    It is written next to `out` and renamed into place only when complete.
    """
    source = HFFolder(hf_dir)
    model_config = source.model_config()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ckpt.CheckpointError(f"{out}: exists and is not empty")
    tmp = out.parent / f"{ckpt.TMP_PREFIX}{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # One copy of the weights in memory: read tensor by tensor, renamed, then saved.
    weights = dict(iter_converted(source, model_config))
    save_file(weights, tmp / "model.safetensors", {"format": "pt"})
    del weights
    tokenizer_note = _copy_tokenizer(source.folder, tmp)
    job = _job_config_for(model_config, out, tokenizer_note)
    write_config(job, tmp / "config.yaml")
    state = {
        "step": 0,
        "tokens_seen": 0,
        "imported_from": str(source.folder.resolve()),
        "architecture": source.family.architecture,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    extra: dict[str, Any] = {
        "step": 0,
        "source": "hf",
        "architecture": source.family.architecture,
        "versions": {"torch": torch.__version__},
    }
    if (tmp / TOKENIZER_FILE).is_file():
        extra["tokenizer_sha256"] = Tokenizer.load(tmp).sha256
    ckpt.write_manifest(tmp, extra)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    logger.info("imported %s (%s) into %s", source.folder, source.family.architecture, out)
    return out


def _copy_tokenizer(hf_dir: Path, out: Path) -> str:
    """Copy the tokenizer files; say which kind was found."""
    for name in (TOKENIZER_CONFIG, "special_tokens_map.json"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    if (hf_dir / TOKENIZER_FILE).is_file():
        Tokenizer.load(hf_dir)  # refuse a file sentencepiece cannot read, now, not at train time
        shutil.copy2(hf_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
        return "sentencepiece"
    if (hf_dir / TOKENIZER_JSON).is_file():
        shutil.copy2(hf_dir / TOKENIZER_JSON, out / TOKENIZER_JSON)
        logger.warning(
            "%s has only tokenizer.json (a `tokenizers` BPE, e.g. Llama-3/Qwen): copied, but "
            "scaletrain reads sentencepiece models only, so generate/eval/train need "
            "tokenizer.path set to a compatible tokenizer.model",
            hf_dir,
        )
        return "tokenizer.json"
    logger.warning("%s has no tokenizer files; weights only", hf_dir)
    return "none"


def _job_config_for(model_config: ModelConfig, folder: Path, tokenizer_kind: str) -> JobConfig:
    """A complete job config around the imported model; `folder` is the final checkpoint."""
    job = JobConfig()
    job.model = model_config
    if tokenizer_kind == "sentencepiece":
        # The checkpoint's own copy, so the config keeps working wherever HF_DIR goes.
        job.tokenizer.path = str(folder.resolve() / TOKENIZER_FILE)
    # The default data.seq_len may exceed a small model's context; keep the config loadable.
    job.data.seq_len = min(job.data.seq_len, model_config.max_seq_len)
    job.train.global_batch_tokens = job.data.seq_len * max(
        1, job.train.global_batch_tokens // job.data.seq_len
    )
    return job


# ---------------------------------------------------------------------------- init_from
def load_hf_weights(model: Transformer, source: str) -> None:
    """`model.init_from: hf:DIR`: copy an HF folder's weights into `model` in place.

    The model's config must describe the same network as DIR/config.json; the first field
    that differs is reported (a different rope_theta loads fine and computes nonsense).
    """
    hf_dir = source.removeprefix(HF_PREFIX)
    folder = HFFolder(hf_dir)
    theirs = folder.model_config()
    ours = model.config
    for name in _SHAPE_FIELDS:
        mine, other = getattr(ours, name), getattr(theirs, name)
        if mine != other:
            raise ConfigError(
                f"model.{name}: {mine!r} does not match {other!r} from {hf_dir}/config.json "
                f"(model.init_from: {source})"
            )
    load_hf_into_model(model, folder)
