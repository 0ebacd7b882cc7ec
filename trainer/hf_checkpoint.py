"""Scaletrain checkpoints <-> Hugging Face folders (`scaletrain export` / `import`, `hf:DIR`).

The weight and config conversion lives in `model.hf`; this module adds what belongs to a
checkpoint or a release: the tokenizer files, generation_config.json, config.yaml, the
manifest. Export reads model.safetensors lazily, so a checkpoint larger than memory exports.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_pipeline.chat import CHAT_TEMPLATE_FILE, checkpoint_template
from data_pipeline.tokenizer import (
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)
from model.config import NETWORK_FIELDS, ModelConfig
from model.hf import DEFAULT_MAX_SHARD_BYTES, HFFolder, family_for, write_hf_weights
from model.hf.weights import iter_converted, load_hf_into_model
from model.lora import is_adapter_name
from model.transformer import Transformer
from trainer.checkpointing import checkpoint as ckpt
from trainer.config import JobConfig, load_job_config, write_config
from trainer.config_io import ConfigError

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Texts on which a converted tokenizer must give our ids and our decoding, besides every
# vocabulary entry: code, runs of spaces/tabs/newlines, unicode, emoji, digits.
_PROBE_TEXTS = (
    "def merge_node(size, index):\n    total = size + 42\n\treturn total  # done\n",
    "  leading, trailing and   inner   spaces  ",
    "\n\n  \n\t\t\r\nx\n",
    "unicode: naïve café Straße 日本語 한국어 русский 🙂🚀 — “quotes” ½",
    "numbers 0 7 42 1234567890 3.14159 -1e-5 0xFF",
    "{\"key\": [1, 2, 3], 'k': None}; a->b && c || !d",
    " x",
    "x ",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------- export
def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    architecture: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    merge_adapters: bool = True,
) -> Path:
    """Write a verified scaletrain checkpoint as an HF folder; return the folder.

    The folder holds config.json, (sharded) safetensors, generation_config.json and the
    tokenizer: see `write_tokenizer_files`. `dtype` None keeps the checkpoint's own. A LoRA
    checkpoint exports merged, or with `merge_adapters=False` as its base model alone (the
    network a peft adapter goes on, see `trainer.peft_export`).
    """
    # data loaders are not needed otherwise
    from trainer.inference import has_adapters, read_checkpoint_weights, resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    ckpt.verify_checkpoint(folder)
    config = load_job_config(folder / "config.yaml", ignore_unknown_sections=True)
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
        load = handle.get_tensor
        if has_adapters(names) and not merge_adapters:  # the base network alone
            numels = [(name, shape) for name, shape in numels if not is_adapter_name(name)]
        elif has_adapters(names):  # a LoRA run: export the merged network
            merged = read_checkpoint_weights(folder)
            numels = [(name, list(tensor.shape)) for name, tensor in merged.items()]
            load = merged.__getitem__
        write_hf_weights(
            out,
            config.model,
            family,
            [(name, _numel(shape)) for name, shape in numels],
            load,
            DTYPES[dtype],
            max_shard_bytes,
        )
    tokenizer = Tokenizer.load(folder)
    write_tokenizer_files(tokenizer, out, config.model.max_seq_len, checkpoint_template(folder))
    generation = {
        "bos_token_id": tokenizer.bos_id,
        # A release's several end tokens (Llama-3: <|end_of_text|>, <|eot_id|>) stay a list.
        "eos_token_id": stops
        if len(stops := tokenizer.stop_ids) > 1
        else _optional_id(tokenizer.eos_id),
        "pad_token_id": _optional_id(tokenizer.pad_id),
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    hf_config = json.loads((out / "config.json").read_text())
    hf_config.update(generation)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    respect_umask(out)
    logger.info("exported %s as %s to %s", folder, family.architecture, out)
    return out


def respect_umask(folder: Path) -> None:
    """Give the safetensors files in `folder` the mode the umask allows (0644 under the usual
    022): safetensors writes them 0600, unreadable to colleagues on a shared cluster."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it; put it back at once
    for path in folder.glob("*.safetensors"):
        path.chmod(0o666 & ~umask)


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _optional_id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None  # sentencepiece says -1 for "none"


def write_tokenizer_files(
    tokenizer: Tokenizer, out: Path, max_seq_len: int, chat_template: str | None = None
) -> None:
    """The tokenizer files that `AutoTokenizer.from_pretrained(out)` loads with our ids.

    `chat_template` (the checkpoint's jinja template) goes into tokenizer_config.json, where
    every transformers version finds it for `apply_chat_template`.

    A `tokenizers` tokenizer is copied as tokenizer.json with PreTrainedTokenizerFast: the
    generic class loads the file as written, where transformers 5's model-specific classes
    rebuild the pipeline from its vocab and merges. A sentencepiece model is written as
    tokenizer.model for LlamaTokenizer, plus a tokenizer.json converted from it when the
    conversion gives our ids on every probe (see `_write_converted_tokenizer_json`).
    Our encode adds no BOS/EOS, so neither does the HF tokenizer.
    """
    special = {
        f"{name}_token": tokenizer.id_to_token(token_id)
        for name, token_id in (
            ("bos", tokenizer.bos_id),
            ("eos", tokenizer.eos_id),
            ("unk", tokenizer.unk_id),
            ("pad", tokenizer.pad_id),
        )
        if token_id >= 0
    }
    tokenizer.save(out)
    tokenizer_config: dict[str, Any]
    if isinstance(tokenizer, SentencePieceTokenizer):
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
    else:
        assert isinstance(tokenizer, HFTokenizer)
        # auto_map would send AutoTokenizer to a release's custom code; the file needs none.
        config = {k: v for k, v in tokenizer.config.items() if k != "auto_map"}
        tokenizer_config = {
            **config,
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": max_seq_len,
            "clean_up_tokenization_spaces": config.get("clean_up_tokenization_spaces", False),
        }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (out / TOKENIZER_CONFIG).write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"
    )
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    if isinstance(tokenizer, SentencePieceTokenizer):
        _write_converted_tokenizer_json(tokenizer, out)


def _write_converted_tokenizer_json(tokenizer: Tokenizer, out: Path) -> None:
    """tokenizer.json from out/tokenizer.model through transformers' sentencepiece converter.

    Kept only if both the converted tokenizer and what AutoTokenizer then loads from `out` give
    our ids and our decoding on the probe texts and on every vocabulary entry; otherwise no
    tokenizer.json is written (transformers still converts tokenizer.model when loading) and
    one log line says why.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        logger.info("no tokenizer.json written: transformers (the converter) is not installed")
        return
    try:
        converted = AutoTokenizer.from_pretrained(out).backend_tokenizer
    except Exception as exc:  # a converter failure must not fail the export
        logger.warning("no tokenizer.json written: converting tokenizer.model failed (%s)", exc)
        return
    texts = _probe_texts(tokenizer)
    mismatch = _first_mismatch(
        tokenizer,
        texts,
        lambda text: converted.encode(text, add_special_tokens=False).ids,
        lambda ids: converted.decode(ids, skip_special_tokens=False),
    )
    if mismatch is None:
        converted.save(str(out / TOKENIZER_JSON))
        reloaded = AutoTokenizer.from_pretrained(out)
        mismatch = _first_mismatch(
            tokenizer,
            texts,
            # verbose=False: the long probes exceed model_max_length on purpose; no warning.
            lambda text: reloaded(text, add_special_tokens=False, verbose=False)["input_ids"],
            lambda ids: str(reloaded.decode(ids, skip_special_tokens=False)),
        )
    if mismatch is not None:
        (out / TOKENIZER_JSON).unlink(missing_ok=True)
        logger.warning(
            "no tokenizer.json written: the converted tokenizer differs from tokenizer.model on "
            "%r (AutoTokenizer converts tokenizer.model itself)",
            mismatch[:60],
        )


def _probe_texts(tokenizer: Tokenizer) -> list[str]:
    """The fixed probes plus every vocabulary entry's text, alone-ish and run together."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id}
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size) if i not in special]
    return [*_PROBE_TEXTS, " ".join(pieces), "".join(pieces), "\n".join(pieces)]


def _first_mismatch(
    tokenizer: Tokenizer,
    texts: list[str],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> str | None:
    """The first text whose ids or decoding differ between `tokenizer` and encode/decode."""
    for text in texts:
        ids = tokenizer.encode(text)
        if list(encode(text)) != ids or decode(ids) != tokenizer.decode(ids):
            return text
    return None


# ---------------------------------------------------------------------------- import
def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert an HF folder into a scaletrain checkpoint folder; return it.

    The checkpoint (model.safetensors, config.yaml, tokenizer, trainer_state.json, manifest)
    loads with `trainer.inference.load_checkpoint_model` and works as `model.init_from`.
    It is written next to `out` and renamed into place only when complete.
    """
    source = HFFolder(hf_dir)
    model_config = source.model_config()
    # Loaded first, so an unreadable tokenizer is refused before anything is written.
    tokenizer = Tokenizer.load(source.folder) if Tokenizer.found_in(source.folder) else None
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
    respect_umask(tmp)
    del weights
    _copy_tokenizer(source.folder, tokenizer, tmp)
    job = _job_config_for(model_config, out, tokenizer)
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
    if tokenizer is not None:
        extra["tokenizer_sha256"] = tokenizer.sha256
    ckpt.write_manifest(tmp, extra)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    logger.info("imported %s (%s) into %s", source.folder, source.family.architecture, out)
    return out


def _copy_tokenizer(hf_dir: Path, tokenizer: Tokenizer | None, out: Path) -> None:
    """Save the folder's tokenizer (tokenizer.model, else tokenizer.json) into `out`.

    A tokenizer.json is saved with its special tokens resolved (tokenizer_config.json, else
    generation_config.json / config.json ids), so the checkpoint needs no other file.
    """
    # The chat template travels with the tokenizer: in tokenizer_config.json (kept by `save`
    # below) or as chat_template.jinja, the file newer releases ship it in.
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    if tokenizer is None:
        logger.warning("%s has no tokenizer files; weights only", hf_dir)
        return
    tokenizer.save(out)
    logger.info(
        "tokenizer: %s (%s, %d ids, bos=%d eos=%d pad=%d)",
        tokenizer.main_file,
        tokenizer.kind,
        tokenizer.vocab_size,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
    )


def _job_config_for(
    model_config: ModelConfig, folder: Path, tokenizer: Tokenizer | None
) -> JobConfig:
    """A complete job config around the imported model; `folder` is the final checkpoint."""
    job = JobConfig()
    job.model = model_config
    if tokenizer is not None:
        # The checkpoint's own copy, so the config keeps working wherever HF_DIR goes.
        job.tokenizer.path = str(folder.resolve() / tokenizer.main_file)
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
    for name, key in NETWORK_FIELDS:
        mine, other = getattr(ours, name), getattr(theirs, name)
        if mine != other:
            raise ConfigError(
                f"model.{key}: {mine!r} does not match {other!r} from {hf_dir}/config.json "
                f"(model.init_from: {source})"
            )
    load_hf_into_model(model, folder)
