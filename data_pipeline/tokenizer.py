"""A sentencepiece tokenizer: train (BPE, byte fallback), load, save, encode and decode."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError

TOKENIZER_FILE = "tokenizer.model"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """A loaded sentencepiece model with its special ids."""

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises a bare RuntimeError/OSError
            raise DataError(f"{source}: not a sentencepiece model ({exc})") from None
        self.model_proto = model_proto
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `path`, a `.model` file or a folder holding `tokenizer.model`."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"{path}: tokenizer model not found")
        return cls(path.read_bytes(), source=str(path))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `tokenizer.model` into `directory`; return its path."""
        target = Path(directory) / TOKENIZER_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.model_proto)
        return target

    @property
    def vocab_size(self) -> int:
        return int(self.processor.GetPieceSize())

    @property
    def bos_id(self) -> int:
        return int(self.processor.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.processor.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self.processor.pad_id())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(self.processor.EncodeAsIds(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.processor.EncodeAsIds(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.processor.DecodeIds(list(ids)))


def _sentences(texts: Iterable[str], max_sentences: int, max_length: int) -> Iterator[str]:
    """Lines of the documents, cut to sentencepiece's sentence length, at most max_sentences."""
    count = 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            yield line[:max_length]
            count += 1
            if count >= max_sentences:
                return


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 300_000,
    max_sentence_length: int = 4096,
) -> Tokenizer:
    """Train a sentencepiece model on `texts`.

    Byte fallback makes every string encodable; identity normalisation, no dummy prefix and kept
    whitespace make decode(encode(text)) == text, which matters for source code.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts, max_sentences, max_sentence_length),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=max_sentence_length,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DataError(f"tokenizer training failed: {str(exc).strip().splitlines()[-1]}") from None
    return Tokenizer(model.getvalue())


def train_tokenizer_on_sources(config: TokenizerConfig, data: DataConfig) -> Tokenizer:
    """Train the `tokenizer.*` tokenizer on the documents of `data.train` (bad records skipped)."""
    from data_pipeline.sources import SkipCounter, iter_documents  # sources imports nothing of ours

    texts = (
        text
        for source in data.train
        for text in iter_documents(
            source,
            "train",
            SkipCounter(strict=False),
            validation_percent=data.builtin_validation_percent,
        )
    )
    return train_tokenizer(
        texts,
        config.vocab_size,
        config.model_type,
        config.train_max_sentences,
        config.train_max_sentence_length,
    )


def copy_tokenizer(source: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Path:
    """Copy a tokenizer file into `directory` (as tokenizer.model)."""
    target = Path(directory) / TOKENIZER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
