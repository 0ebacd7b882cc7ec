"""tokenizer.json (Hugging Face `tokenizers`) tokenizers: ours vs AutoTokenizer, import,
fine-tune, generate and export; and the tokenizer.json converted from our sentencepiece model."""

from __future__ import annotations

import json
import logging
import math
import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from data_pipeline.tokenizer import (  # noqa: E402
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    train_tokenizer,
)
from tests.helpers import small_config, synthetic_document  # noqa: E402

# The pre-tokenizer splits of Qwen2 and Llama-3 (contractions, letters, digits, punctuation,
# newlines, spaces); Llama-3 groups up to three digits, Qwen2 splits every digit.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
MODEL_VOCAB = 640  # larger than the tokenizer's, padded like Qwen's released embeddings
TEXTS = [
    "def merge_node(size, index):\n    total = size + 42\n\treturn total  # done\n",
    "  leading, trailing and   inner   spaces  ",
    "\n\n  \n\t\t\r\nx\r\n",
    "unicode: naïve café Straße 日本語 한국어 русский 🙂🚀 — “quotes” ½ ｆｕｌｌ",
    "numbers 0 7 42 1234567890 3.14159 -1e-5 0xFF",
    "{\"key\": [1, 2, 3], 'k': None}; a->b && c || !d; it's we'll",
    "e\u0301 (combining) vs \u00e9",
    "document one<|endoftext|>document two",
]


def _training_texts() -> list[str]:
    rng = random.Random(0)
    return [synthetic_document(rng) for _ in range(300)] + TEXTS[:6]


def build_tokenizer_json(style: str) -> tuple[Any, dict[str, Any]]:
    """A tiny byte-level BPE trained with `tokenizers`, in the layout of a Qwen2 or Llama-3
    release; returns it and its tokenizer_config.json."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tokenizer = tokenizers.Tokenizer(models.BPE())
    split = QWEN2_SPLIT if style == "qwen2" else LLAMA3_SPLIT
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=480, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_training_texts(), trainer)
    if style == "qwen2":  # special tokens after the merges, as in the releases
        tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
        }
    else:
        tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
        # No eos_token: its id comes from generation_config.json, as for some releases.
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "clean_up_tokenization_spaces": True,
            "model_max_length": 131072,
        }
    return tokenizer, config


def save_hf_folder(style: str, folder: Path) -> tuple[Any, Any]:
    """A tiny Qwen2 or Llama HF model folder with the tokenizer of `style`; returns both."""
    tokenizer, tokenizer_config = build_tokenizer_json(style)
    common = {
        "vocab_size": MODEL_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    if style == "qwen2":
        eos = tokenizer.token_to_id("<|endoftext|>")
        config = transformers.Qwen2Config(**common, eos_token_id=eos, tie_word_embeddings=True)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        bos, eos = (
            tokenizer.token_to_id("<|begin_of_text|>"),
            tokenizer.token_to_id("<|end_of_text|>"),
        )
        config = transformers.LlamaConfig(**common, bos_token_id=bos, eos_token_id=eos)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if style == "llama3":
        eot = tokenizer.token_to_id("<|eot_id|>")
        generation = {"bos_token_id": bos, "eos_token_id": [eos, eot]}
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return model, tokenizer


def assert_same_ids(ours: Tokenizer, theirs: Any) -> None:
    """AutoTokenizer gives our ids (no special tokens added) and our decoding, on every text."""
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs.decode(ids, clean_up_tokenization_spaces=False) == ours.decode(ids)


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_tokenizer_json_matches_autotokenizer(style: str, tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    _, backend = save_hf_folder(style, hf_dir)
    ours = Tokenizer.load(hf_dir)
    assert isinstance(ours, HFTokenizer) and ours.kind == "tokenizers"
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert_same_ids(ours, theirs)
    for text in TEXTS[:-1]:  # byte-level BPE: decode inverts encode (after Qwen2's NFC)
        expected = unicodedata.normalize("NFC", text) if style == "qwen2" else text
        assert ours.decode(ours.encode(text)) == expected
    assert ours.encode_batch(TEXTS) == [ours.encode(text) for text in TEXTS]
    assert ours.vocab_size == backend.get_vocab_size(with_added_tokens=True) == 483
    if style == "qwen2":  # special tokens named in tokenizer_config.json
        eos = backend.token_to_id("<|endoftext|>")
        assert (ours.bos_id, ours.eos_id, ours.pad_id) == (-1, eos, eos)
        assert theirs.eos_token_id == eos
        # A special token in the text is that token, as AutoTokenizer reads it.
        assert eos in ours.encode(TEXTS[-1])
    else:  # eos from generation_config.json (its first id), bos from tokenizer_config.json
        assert ours.bos_id == backend.token_to_id("<|begin_of_text|>") == theirs.bos_token_id
        assert ours.eos_id == backend.token_to_id("<|end_of_text|>")
        assert ours.pad_id == -1
        # Every end token of generation_config.json stops a generation (<|eot_id|> too).
        assert ours.stop_ids == [ours.eos_id, backend.token_to_id("<|eot_id|>")]
    # What a checkpoint or a worker process holds rebuilds the same tokenizer, sidecars gone.
    again = Tokenizer.from_files(ours.files())
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert (again.bos_id, again.eos_id, again.pad_id, again.sha256, again.stop_ids) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
        ours.sha256,
        ours.stop_ids,
    )
    saved = Tokenizer.load(ours.save(tmp_path / "copy"))
    assert saved.eos_id == ours.eos_id and saved.sha256 == ours.sha256


def test_bad_tokenizer_json_files_are_one_line_errors(tmp_path: Path) -> None:
    from data_pipeline.errors import DataError

    tokenizer, _ = build_tokenizer_json("qwen2")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match=r"eos_token '<\|nope\|>' is not in the vocabulary"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match=r"tokenizer model not found"):
        Tokenizer.load(tmp_path / "empty")


def test_prepared_shards_with_a_tokenizer_json(tmp_path: Path, corpus: Path) -> None:
    """`data prepare` shards (two worker processes) hold our ids plus the tokenizer's EOS, and the
    fingerprint refuses shards made with another tokenizer."""
    import numpy as np

    from data_pipeline.config import DataConfig, SourceConfig
    from data_pipeline.errors import DataError
    from data_pipeline.packing import build_packed_sequences
    from data_pipeline.shards import ShardSource, prepare_shards
    from data_pipeline.sources import SkipCounter, iter_documents

    save_hf_folder("llama3", tmp_path / "hf")
    tokenizer = Tokenizer.load(tmp_path / "hf")
    source = SourceConfig(str(corpus / "validation.jsonl"), name="v")
    config = DataConfig(train=[source], validation=[source], num_workers=2)
    metadata = prepare_shards(config, tokenizer, tmp_path / "shards", SkipCounter(True))
    assert metadata["fingerprint"]["tokenizer_sha256"] == tokenizer.sha256
    assert metadata["fingerprint"]["special_ids"]["eos"] == tokenizer.eos_id
    (entry,) = metadata["splits"]["train"]
    shard = ShardSource(tmp_path / "shards", entry, np.dtype(np.uint16))
    texts = list(iter_documents(source, "train", SkipCounter(True)))
    assert len(shard) == len(texts)
    for index, text in enumerate(texts):
        assert shard.document(index).tolist() == [*tokenizer.encode(text), tokenizer.eos_id]

    other = train_tokenizer(texts, vocab_size=320)
    prepared = DataConfig(seq_len=16, train=[source], prepared=str(tmp_path / "shards"))
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        build_packed_sequences([source], "train", other, prepared, SkipCounter(False), True)


def test_import_finetune_generate_and_export_with_tokenizer_json(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole path of a Llama-3-style release: import keeps its tokenizer; `scaletrain train`
    with model.init_from: hf:DIR tokenizes the data with it (its EOS between documents);
    generate decodes, eval reads; export writes a tokenizer.json that AutoTokenizer reads with our ids."""
    from launch.cli import main
    from launch.environment import detect_environment
    from tests.test_training import train_in_subprocess
    from trainer.config import job_config_from_dict, load_job_config
    from trainer.inference import load_checkpoint_model
    from trainer.trainer import Trainer

    hf_dir = tmp_path / "hf"
    theirs_model, backend = save_hf_folder("llama3", hf_dir)
    source = Tokenizer.load(hf_dir)
    eos = backend.token_to_id("<|end_of_text|>")

    imported = tmp_path / "imported"
    assert main(["import", str(hf_dir), "--out", str(imported)]) == 0
    assert (imported / "tokenizer.json").is_file() and not (imported / "tokenizer.model").exists()
    loaded = load_checkpoint_model(imported)
    assert loaded.tokenizer.kind == "tokenizers" and loaded.tokenizer.eos_id == eos
    assert loaded.tokenizer.sha256 == source.sha256
    assert loaded.config.tokenizer.path == str(imported.resolve() / "tokenizer.json")

    # Fine-tune from the HF folder; no tokenizer.path: the folder's tokenizer is the run's.
    model_section = yaml.safe_load((imported / "config.yaml").read_text())["model"]
    raw = small_config(tmp_path / "run", corpus, train={"max_steps": 2, "eval_every": 0})
    raw["model"] = {**model_section, "init_from": f"hf:{hf_dir}"}
    trainer = Trainer(job_config_from_dict(raw), detect_environment())
    trainer.setup()
    assert trainer.tokenizer.sha256 == source.sha256 and trainer.tokenizer.eos_id == eos
    # Row r of every global batch continues logical shard r's stream (inputs of consecutive
    # sequences are consecutive tokens: the last label is the next input's first).
    batches = [trainer.loader.next_batch() for _ in range(4)]
    stream = [token for batch in batches for inputs, _ in batch[:1] for token in inputs[0].tolist()]
    # Whole documents between two EOS ids decode to documents of the corpus.
    documents = {json.loads(line)["text"] for line in (corpus / "train.jsonl").open()}
    segments = source.decode(stream).split("<|end_of_text|>")[1:-1]
    assert len(segments) >= 2 and all(segment in documents for segment in segments)
    del trainer

    raw["run"]["dir"] = str(tmp_path / "run_cli")
    result = train_in_subprocess(raw, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "run_cli"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m and "eval_loss" not in m]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    checkpoint = load_checkpoint_model(run_dir)
    assert checkpoint.tokenizer.sha256 == source.sha256 and checkpoint.tokenizer.eos_id == eos
    assert load_job_config(checkpoint.folder / "config.yaml").model.init_from == f"hf:{hf_dir}"

    capsys.readouterr()
    prompt = "def compute_value(items):\n"
    assert main(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(prompt) and len(printed) > len(prompt)
    data = str(corpus / "validation.jsonl")
    assert main(["eval", str(run_dir), "--data", data, "--max-sequences", "4"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert math.isfinite(evaluated["eval_loss"]) and evaluated["tokens"] == 4 * 64

    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert not (out / "tokenizer.model").exists()
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["eos_token"] == "<|end_of_text|>"
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert_same_ids(checkpoint.tokenizer, exported)
    assert (exported.eos_token_id, exported.bos_token_id) == (eos, source.bos_id)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [eos, backend.token_to_id("<|eot_id|>")]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    batch = torch.tensor([source.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(batch).logits, checkpoint.model(batch), atol=1e-5, rtol=1e-5
        )
        # Fine-tuning moved the weights away from the release.
        assert (reloaded(batch).logits - theirs_model(batch).logits).abs().max() > 1e-4


def test_qwen2_style_import_export_round_trip(tmp_path: Path) -> None:
    from trainer.hf_checkpoint import export_checkpoint, import_hf

    hf_dir = tmp_path / "hf"
    save_hf_folder("qwen2", hf_dir)
    config_path = hf_dir / "tokenizer_config.json"
    custom = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "auto_map": custom}))
    imported = import_hf(hf_dir, tmp_path / "imported")
    out = export_checkpoint(imported, tmp_path / "export")
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    ours = Tokenizer.load(imported)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert_same_ids(ours, exported)
    assert exported.eos_token_id == ours.eos_id == exported.pad_token_id
    assert Tokenizer.load(out).sha256 == Tokenizer.load(hf_dir).sha256


# ---------------------------------------------------------------- sentencepiece -> tokenizer.json
def test_sentencepiece_export_adds_an_exact_tokenizer_json(tmp_path: Path) -> None:
    from trainer.hf_checkpoint import write_tokenizer_files

    ours = train_tokenizer(_training_texts(), vocab_size=320)
    write_tokenizer_files(ours, tmp_path, max_seq_len=128)
    assert (tmp_path / "tokenizer.model").is_file() and (tmp_path / "tokenizer.json").is_file()
    converted = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS[:-1]:  # sentencepiece reads "<|endoftext|>" as plain text, so does this
        assert converted.encode(text, add_special_tokens=False).ids == ours.encode(text)
    assert_same_ids(ours, transformers.AutoTokenizer.from_pretrained(tmp_path))
    assert isinstance(Tokenizer.load(tmp_path), SentencePieceTokenizer)  # tokenizer.model first


def test_inexact_sentencepiece_conversion_writes_no_tokenizer_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NFKC normalisation (sentencepiece's default) is not carried over by the Llama converter:
    "½" and full-width letters then encode differently, so no tokenizer.json is written."""
    import io

    import sentencepiece as spm

    from trainer.hf_checkpoint import write_tokenizer_files

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_texts()),
        model_writer=model,
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=False,
        minloglevel=2,
    )
    ours = SentencePieceTokenizer(model.getvalue())
    assert ours.decode(ours.encode("½")) != "½"  # NFKC: the model itself rewrites it
    with caplog.at_level(logging.WARNING, logger="trainer.hf_checkpoint"):
        write_tokenizer_files(ours, tmp_path, max_seq_len=128)
    assert (tmp_path / "tokenizer.model").is_file()
    assert not (tmp_path / "tokenizer.json").exists()
    (line,) = [r.getMessage() for r in caplog.records if "tokenizer.json" in r.getMessage()]
    assert line.startswith("no tokenizer.json written: the converted tokenizer differs")
