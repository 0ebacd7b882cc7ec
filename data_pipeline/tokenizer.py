"""Tokenizers: sentencepiece (`tokenizer.model`) or Hugging Face `tokenizers` (`tokenizer.json`).

Both backends give the same interface (`Tokenizer`): encode without special tokens, decode,
vocabulary size, special ids (-1 for "none"), a SHA-256 fingerprint and save-to-folder.
`Tokenizer.load` picks the backend from the files present. We train sentencepiece models
(BPE, byte fallback); `tokenizer.json` comes with released weights (Llama-3, Qwen2/3).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import sentencepiece as spm

from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError

TOKENIZER_FILE = "tokenizer.model"  # sentencepiece
TOKENIZER_JSON = "tokenizer.json"  # Hugging Face `tokenizers`
TOKENIZER_CONFIG = "tokenizer_config.json"
# Where released folders keep special ids when tokenizer_config.json does not name the token.
GENERATION_CONFIG = "generation_config.json"
_ID_SIDECARS = (GENERATION_CONFIG, "config.json")
SPECIAL_NAMES = ("bos", "eos", "pad", "unk")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(ABC):
    """What every consumer uses: encode/decode, vocabulary size, special ids, hash, save."""

    kind: str  # "sentencepiece" or "tokenizers"
    source: str

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `path`: a folder (tokenizer.model preferred, else tokenizer.json), a `.model`
        file, or a `tokenizer.json` (special tokens from the JSON files beside it)."""
        path = Path(path)
        if path.is_dir():
            if (path / TOKENIZER_FILE).is_file():
                return SentencePieceTokenizer.from_file(path / TOKENIZER_FILE)
            if (path / TOKENIZER_JSON).is_file():
                return HFTokenizer.from_file(path / TOKENIZER_JSON)
            raise DataError(
                f"{path}: tokenizer model not found ({TOKENIZER_FILE} or {TOKENIZER_JSON})"
            )
        if not path.is_file():
            raise DataError(f"{path}: tokenizer model not found")
        if path.suffix == ".json":
            return HFTokenizer.from_file(path)
        return SentencePieceTokenizer.from_file(path)

    @staticmethod
    def found_in(folder: str | os.PathLike[str]) -> bool:
        """Whether `folder` holds a tokenizer `load` can read."""
        return any((Path(folder) / name).is_file() for name in (TOKENIZER_FILE, TOKENIZER_JSON))

    @staticmethod
    def from_files(files: Mapping[str, bytes], source: str = "<memory>") -> Tokenizer:
        """Rebuild a tokenizer from what `files()` returned (e.g. in a worker process)."""
        if TOKENIZER_FILE in files:
            return SentencePieceTokenizer(files[TOKENIZER_FILE], source)
        config = json.loads(files[TOKENIZER_CONFIG]) if TOKENIZER_CONFIG in files else {}
        generation = json.loads(files[GENERATION_CONFIG]) if GENERATION_CONFIG in files else {}
        stop = _all_ids(generation.get("eos_token_id"))
        return HFTokenizer(files[TOKENIZER_JSON], config, {}, source, stop_ids=stop)

    @abstractmethod
    def files(self) -> dict[str, bytes]:
        """File name -> contents: everything `save` writes and `from_files` needs."""

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer's files into `directory`; return the path `load` takes."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in self.files().items():
            (folder / name).write_bytes(content)
        return folder / self.main_file

    @property
    @abstractmethod
    def main_file(self) -> str:
        """The file that holds the model (tokenizer.model or tokenizer.json)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can produce."""

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: EOS, plus a release's other end tokens (Llama-3's
        <|eot_id|>) listed in its generation_config.json."""
        return [self.eos_id] if self.eos_id >= 0 else []

    @property
    @abstractmethod
    def unk_id(self) -> int: ...

    @property
    def sha256(self) -> str:
        """SHA-256 of the model file (what shards and checkpoints are fingerprinted with)."""
        return hashlib.sha256(self.files()[self.main_file]).hexdigest()

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no BOS/EOS added."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` (a piece, a byte-level token, a special token)."""

    @abstractmethod
    def token_to_id(self, token: str) -> int:
        """The id of vocabulary entry `token`, or -1 when the vocabulary lacks it."""

    @abstractmethod
    def special_ids(self) -> set[int]:
        """Ids of the control tokens (BOS/EOS, chat markers such as <|im_end|>): tokens that
        stand for themselves rather than for text."""

    @abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's (start, end) character span in `text`."""

    @abstractmethod
    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A copy with `tokens` appended to the vocabulary as special tokens, matched whole
        in any text (ids vocab_size, vocab_size + 1, ...). Tokens already present are kept."""


class SentencePieceTokenizer(Tokenizer):
    """A loaded sentencepiece model with its special ids."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises a bare RuntimeError/OSError
            raise DataError(f"{source}: not a sentencepiece model ({exc})") from None
        self.model_proto = model_proto
        self.source = source

    @classmethod
    def from_file(cls, path: Path) -> SentencePieceTokenizer:
        return cls(path.read_bytes(), source=str(path))

    def files(self) -> dict[str, bytes]:
        return {TOKENIZER_FILE: self.model_proto}

    @property
    def main_file(self) -> str:
        return TOKENIZER_FILE

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
    def unk_id(self) -> int:
        return int(self.processor.unk_id())

    def encode(self, text: str) -> list[int]:
        return list(self.processor.EncodeAsIds(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.processor.EncodeAsIds(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.processor.DecodeIds(list(ids)))

    def id_to_token(self, token_id: int) -> str:
        return str(self.processor.IdToPiece(token_id))

    def token_to_id(self, token: str) -> int:
        token_id = int(self.processor.PieceToId(token))
        # Unknown pieces map to unk: tell them apart from the real <unk> entry.
        return token_id if self.id_to_token(token_id) == token else -1

    def special_ids(self) -> set[int]:
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
        model.ParseFromString(self.model_proto)
        kinds = (model.pieces[0].CONTROL, model.pieces[0].USER_DEFINED)
        return {i for i, piece in enumerate(model.pieces) if piece.type in kinds}

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        proto = self.processor.encode(text, out_type="proto")
        # sentencepiece reports byte offsets into the UTF-8 input; map them to characters.
        char_at_byte = [0] * (len(text.encode("utf-8")) + 1)
        position = 0
        for index, char in enumerate(text):
            width = len(char.encode("utf-8"))
            for offset in range(width):
                char_at_byte[position + offset] = index
            position += width
        char_at_byte[position] = len(text)
        ids = [int(piece.id) for piece in proto.pieces]
        offsets = [(char_at_byte[piece.begin], char_at_byte[piece.end]) for piece in proto.pieces]
        return ids, offsets

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
        model.ParseFromString(self.model_proto)
        for token in dict.fromkeys(tokens):
            if self.token_to_id(token) >= 0:
                continue
            # USER_DEFINED pieces are matched whole in the raw text before segmentation.
            model.pieces.add(piece=token, score=0.0, type=model.pieces[0].USER_DEFINED)
        return SentencePieceTokenizer(model.SerializeToString(), self.source)


def _token_content(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any) -> int | None:
    """A `*_token_id` entry: an int, or a list of them (the first is the main one)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _all_ids(value: Any) -> list[int]:
    """Every id of an `eos_token_id` entry (an int or a list of them)."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json, with special tokens resolved once.

    Each special id comes from tokenizer_config.json's `<name>_token` when it names one, else
    from `<name>_token_id` in generation_config.json or config.json (`fallback_ids`), else -1.
    `files()` writes the resolved tokens back into tokenizer_config.json, so a copy without
    those sidecars (a checkpoint, a worker) gets the same ids.
    """

    kind = "tokenizers"

    def __init__(
        self,
        tokenizer_json: bytes,
        config: dict[str, Any],
        fallback_ids: Mapping[str, int],
        source: str = "<memory>",
        stop_ids: Iterable[int] = (),
    ) -> None:
        from tokenizers import Tokenizer as Backend  # only this backend needs it

        try:
            self.backend = Backend.from_str(tokenizer_json.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{source}: not a tokenizers tokenizer.json ({exc})") from None
        self.tokenizer_json = tokenizer_json
        self.source = source
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        self.config = dict(config)
        self._special: dict[str, int] = {}
        for name in SPECIAL_NAMES:
            token = _token_content(config.get(f"{name}_token"))
            if token is not None:
                token_id = vocab.get(token)
                if token_id is None:
                    raise DataError(
                        f"{source}: {TOKENIZER_CONFIG} {name}_token {token!r} is not in the vocabulary"
                    )
            else:
                token_id = fallback_ids.get(name, -1)
                if not 0 <= token_id < self._vocab_size:
                    token_id = -1  # e.g. an id of the model's padded vocabulary, not a token
            self._special[name] = token_id
            if token_id >= 0:
                self.config[f"{name}_token"] = self.backend.id_to_token(token_id)
        eos = [self._special["eos"]] if self._special["eos"] >= 0 else []
        extra = [i for i in stop_ids if 0 <= i < self._vocab_size and i not in eos]
        self._stop_ids = eos + list(dict.fromkeys(extra))

    @classmethod
    def from_file(cls, path: Path) -> HFTokenizer:
        """Load `path` (a tokenizer.json) with the JSON files beside it."""
        folder = path.parent
        config = _read_json(folder / TOKENIZER_CONFIG)
        fallback: dict[str, int] = {}
        stop: list[int] = []
        for sidecar in _ID_SIDECARS:
            values = _read_json(folder / sidecar)
            for name in SPECIAL_NAMES:
                token_id = _first_id(values.get(f"{name}_token_id"))
                if token_id is not None:
                    fallback.setdefault(name, token_id)
            stop = stop or _all_ids(values.get("eos_token_id"))
        return cls(path.read_bytes(), config, fallback, source=str(path), stop_ids=stop)

    def files(self) -> dict[str, bytes]:
        config = json.dumps(self.config, indent=2, ensure_ascii=False) + "\n"
        files = {TOKENIZER_JSON: self.tokenizer_json, TOKENIZER_CONFIG: config.encode("utf-8")}
        if len(self._stop_ids) > 1:  # keep the release's extra end tokens with the tokenizer
            generation = json.dumps({"eos_token_id": self._stop_ids}) + "\n"
            files[GENERATION_CONFIG] = generation.encode("utf-8")
        return files

    @property
    def stop_ids(self) -> list[int]:
        return list(self._stop_ids)

    @property
    def main_file(self) -> str:
        return TOKENIZER_JSON

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._special["bos"]

    @property
    def eos_id(self) -> int:
        return self._special["eos"]

    @property
    def pad_id(self) -> int:
        return self._special["pad"]

    @property
    def unk_id(self) -> int:
        return self._special["unk"]

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [list(encoding.ids) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=False))

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise DataError(f"{self.source}: no token with id {token_id}")
        return str(token)

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        return -1 if token_id is None else int(token_id)

    def special_ids(self) -> set[int]:
        added = self.backend.get_added_tokens_decoder()
        return {int(i) for i, token in added.items() if token.special}

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), [(int(a), int(b)) for a, b in encoding.offsets]

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(self.backend.to_str())
        new = [t for t in dict.fromkeys(tokens) if self.token_to_id(t) < 0]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        copy = HFTokenizer(
            backend.to_str().encode("utf-8"), self.config, {}, self.source, self._stop_ids
        )
        return copy


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


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
    return SentencePieceTokenizer(model.getvalue())


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
