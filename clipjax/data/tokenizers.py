"""Text tokenizers with one interface: `.encode(list[str]) -> int32 [N, max_len]`.

Every tokenizer here pads with id 0, wraps each text as [bos] tokens [eos]
(truncating the tokens, never the eos, so the last real token is always eos)
and exposes `vocab_size`, `max_len`, `pad_id`, `bos_id`, `eos_id`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tempfile
from typing import Any, Sequence

import numpy as np
import sentencepiece as spm

from clipjax import paths
from clipjax.data import locking
from clipjax.schema import Field, Section

PAD_ID = 0


def _as_str(text: str | bytes) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def _pack(rows: Sequence[Sequence[int]], max_len: int, bos: int | None, eos: int | None) -> np.ndarray:
    out = np.zeros((len(rows), max_len), dtype=np.int32)
    room = max_len - (bos is not None) - (eos is not None)
    if room < 0:
        raise ValueError(f"max_len {max_len} leaves no room for bos/eos")
    for i, ids in enumerate(rows):
        row = ([bos] if bos is not None else []) + list(ids[:room])
        if eos is not None:
            row.append(eos)
        out[i, : len(row)] = row
    return out


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids: pad 0, bos 1, eos 2, byte b -> b+3."""

    pad_id = PAD_ID
    bos_id = 1
    eos_id = 2
    _OFFSET = 3

    def __init__(self, max_len: int):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3, got {max_len}")
        self.max_len = int(max_len)
        self.vocab_size = 256 + self._OFFSET

    def encode(self, texts: Sequence[str | bytes]) -> np.ndarray:
        rows = []
        for t in texts:
            data = t if isinstance(t, bytes) else t.encode("utf-8")
            rows.append((np.frombuffer(data, np.uint8).astype(np.int32) + self._OFFSET).tolist())
        return _pack(rows, self.max_len, self.bos_id, self.eos_id)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self._OFFSET for i in ids if int(i) >= self._OFFSET)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model; ids shifted by one if the model's pad id is not 0.

    Models trained by `train_sentencepiece` already use pad 0 (unk 1, bos 2,
    eos 3). Other models (commonly unk 0, no pad) get every id shifted up by one
    so that 0 stays free for padding.
    """

    def __init__(self, model_file: str | None = None, max_len: int = 32, *, model_proto: bytes | None = None):
        if model_proto is None:
            if not model_file or not paths.exists(model_file):
                raise FileNotFoundError(f"sentencepiece model file {model_file!r} does not exist")
            model_proto = paths.read_bytes(model_file)  # a local file or a bucket URL
        self.max_len = int(max_len)
        self.model_file = model_file
        self._load(model_proto)

    def _load(self, model_proto: bytes) -> None:
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._shift = 0 if self._sp.pad_id() == PAD_ID else 1
        self.pad_id = PAD_ID
        self.vocab_size = self._sp.get_piece_size() + self._shift
        self.bos_id = self._sp.bos_id() + self._shift if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() + self._shift if self._sp.eos_id() >= 0 else None
        self.unk_id = self._sp.unk_id() + self._shift

    # The processor itself does not pickle; grain worker processes need to.
    def __getstate__(self) -> dict[str, Any]:
        return {"proto": self._proto, "max_len": self.max_len, "model_file": self.model_file}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_len = state["max_len"]
        self.model_file = state["model_file"]
        self._load(state["proto"])

    def encode(self, texts: Sequence[str | bytes]) -> np.ndarray:
        pieces = self._sp.encode([_as_str(t) for t in texts], out_type=int)
        if self._shift:
            pieces = [[i + self._shift for i in row] for row in pieces]
        return _pack(pieces, self.max_len, self.bos_id, self.eos_id)

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([int(i) - self._shift for i in ids if int(i) not in special])

    def pieces(self) -> list[str]:
        """Vocabulary in id order (index 0 is padding)."""
        shifted = ["<pad>"] * self._shift
        return shifted + [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]


def train_sentencepiece(
    texts: Sequence[str], model_prefix: str, vocab_size: int, model_type: str = "word"
) -> str:
    """Trains a model on `texts` in memory; writes `<model_prefix>.model`.

    `vocab_size` is an upper bound: small corpora (a few dozen distinct words)
    yield fewer pieces instead of failing. Returns the model file path.
    """
    texts = [t for t in (_as_str(t) for t in texts) if t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=int(vocab_size),
        model_type=model_type,
        pad_id=PAD_ID,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        hard_vocab_limit=False,
        character_coverage=1.0,
        # One thread and the full corpus keep the model identical across hosts.
        num_threads=1,
        input_sentence_size=0,
        minloglevel=2,
    )
    path = model_prefix + ".model"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Atomic replace: a concurrent reader never sees a half-written model.
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    # mkstemp makes the file 0600; the cache is shared by everyone who shares the data_dir.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return path


# `data.tokenizer.*`.
SECTION = Section(
    {
        "kind": Field(
            "sentencepiece", "`byte` (no vocabulary) or `sentencepiece`", choices=("byte", "sentencepiece")
        ),
        "max_len": Field(12, "context length in tokens", minimum=1),
        "vocab_size": Field(128, "sentencepiece: vocabulary size when trained on the captions", minimum=8),
        "model_file": Field(
            "", "sentencepiece: a trained .model file (empty: train on the captions, cached)"
        ),
        "model_type": Field(
            "word",
            "sentencepiece trained on the captions: `word` suits templated captions",
            choices=("word", "unigram", "bpe"),
        ),
    },
    doc="the tokenizer",
)


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "clipjax_tokenizers")


def make_tokenizer(
    tokenizer_config: Any, *, texts_for_training: Sequence[str] | None = None, cache_dir: str | None = None
):
    """Builds the tokenizer described by `config.data.tokenizer`.

    kind='byte': ByteTokenizer(max_len).
    kind='sentencepiece': loads `model_file` when given (a given but missing file
    is an error); otherwise trains on `texts_for_training` (model_type from the
    config, default 'word') and caches the model in `cache_dir` under a name
    derived from the texts and settings, so later runs and other processes reuse
    it.
    """
    values = SECTION.read(tokenizer_config, "data.tokenizer")
    kind = values["kind"]
    max_len = values["max_len"]
    if kind == "byte":
        return ByteTokenizer(max_len)

    model_file = values["model_file"]
    if model_file:
        model_file = paths.resolve(model_file)
        if not paths.exists(model_file):
            raise FileNotFoundError(f"tokenizer.model_file {model_file!r} does not exist")
        return SentencePieceTokenizer(model_file, max_len)

    if texts_for_training is None:
        raise ValueError("sentencepiece tokenizer without model_file needs texts_for_training")
    vocab_size = values["vocab_size"]
    model_type = values["model_type"]
    texts = [_as_str(t) for t in texts_for_training]
    digest = hashlib.sha1(f"{model_type}|{vocab_size}|v1\n".encode())
    for t in texts:
        digest.update(t.encode("utf-8", errors="replace") + b"\n")
    name = f"spm_{model_type}_{vocab_size}_{digest.hexdigest()[:16]}"
    if cache_dir and paths.is_remote(cache_dir):
        return SentencePieceTokenizer(
            _cached_in_bucket(paths.join(cache_dir, name + ".model"), texts, values), max_len
        )
    cache_dir = locking.ensure_writable_dir(cache_dir or default_cache_dir(), "tokenizer cache_dir")
    prefix = os.path.join(cache_dir, name)
    path = prefix + ".model"
    if not os.path.exists(path):
        with locking.file_lock(prefix + ".lock"):
            if not os.path.exists(path):
                train_sentencepiece(texts, prefix, vocab_size, model_type)
    return SentencePieceTokenizer(path, max_len)


def _cached_in_bucket(url: str, texts: Sequence[str], values: dict) -> str:
    """The model at bucket `url`, trained (in a local temporary folder) and uploaded if missing.

    No file lock reaches a bucket. Processes that both find it missing both train it; training
    is deterministic (one thread, the full corpus), so they upload the same bytes, each in one
    atomic write, and a reader never sees half a model.
    """
    if not paths.exists(url):
        with tempfile.TemporaryDirectory(prefix="clipjax-spm-") as tmp:
            local = train_sentencepiece(
                texts, os.path.join(tmp, "model"), values["vocab_size"], values["model_type"]
            )
            with open(local, "rb") as f:
                paths.write_atomic(url, f.read())
    return url


def tokenizer_to_json(tokenizer) -> dict[str, Any]:
    """Everything needed to rebuild `tokenizer` without its training data or files (checkpoints
    store this, so a moved or grown dataset cannot change what token ids mean)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte", "max_len": tokenizer.max_len}
    return {
        "kind": "sentencepiece",
        "max_len": tokenizer.max_len,
        "model_proto": base64.b64encode(tokenizer._proto).decode("ascii"),
    }


def tokenizer_from_json(saved: dict[str, Any]):
    if saved["kind"] == "byte":
        return ByteTokenizer(saved["max_len"])
    return SentencePieceTokenizer(
        max_len=saved["max_len"], model_proto=base64.b64decode(saved["model_proto"])
    )
