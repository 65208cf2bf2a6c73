"""Text tokenizers with one interface: `.encode(list[str]) -> int32 [N, max_len]`.

Every tokenizer here exposes `vocab_size`, `max_len`, `pad_id`, `bos_id`, `eos_id` (None where
the tokenizer adds no such token) and truncates a text's tokens, never its end-of-text token.

The tokenizers of this repo (`byte`, `sentencepiece` in the default `clipjax` style) pad with id 0
and wrap each text as [bos] tokens [eos]. The pretrained-model tokenizers give the ids the
published models were trained with, padding included:

  * `clip_bpe` (`clipjax.data.clip_bpe.ClipBpeTokenizer`): OpenAI CLIP / open_clip.
  * `hf` (`HfTokenizer`): any Hugging Face `tokenizer.json`, as transformers pads and truncates it.
  * `sentencepiece` with `style='siglip'` (`SiglipSentencePieceTokenizer`): transformers'
    `SiglipTokenizer` on SigLIP's `spiece.model`.
  * SigLIP 2's Gemma tokenizer, `style='siglip2'`: `hf` on its `tokenizer.json` gives the ids of
    transformers' `Siglip2Tokenizer`; `sentencepiece` on its `tokenizer.model`
    (`Siglip2SentencePieceTokenizer`) those of big_vision, which trained it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import re
import string
import tempfile
import unicodedata
from typing import Any, Sequence

import numpy as np
import sentencepiece as spm

from clipjax import paths
from clipjax.data import locking
from clipjax.schema import ConfigError, Field, Section

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


SIGLIP_EOS = "</s>"
SIGLIP_UNK = "<unk>"
_SPIECE_SPACE = "\u2581"  # sentencepiece's word-boundary mark
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class SiglipSentencePieceTokenizer(SentencePieceTokenizer):
    """SigLIP's conventions on its `spiece.model`: the ids of transformers' `SiglipTokenizer`
    called with `padding="max_length", truncation=True, max_length=max_len` (SigLIP: 64).

    The model's own ids (no shift); no start token; `</s>` appended unless the tokens already
    end with it; padding with `pad_token` (SigLIP's: `</s>`, so `pad_id == eos_id`). Each text is
    canonicalised: lower case, ASCII punctuation removed, whitespace runs collapsed. `</s>` and
    `<unk>` written in the text are those tokens, and the spaces around them are dropped.
    """

    style = "siglip"

    def __init__(
        self,
        model_file: str | None = None,
        max_len: int = 64,
        *,
        model_proto: bytes | None = None,
        pad_token: str = "",
    ):
        self.pad_token = pad_token or SIGLIP_EOS
        super().__init__(model_file, max_len, model_proto=model_proto)

    def _load(self, model_proto: bytes) -> None:
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._shift = 0
        self._special_ids = {}
        for piece in (SIGLIP_EOS, SIGLIP_UNK, self.pad_token):
            i = self._sp.piece_to_id(piece)
            if self._sp.id_to_piece(i) != piece:
                raise ValueError(
                    f"sentencepiece model has no {piece!r} piece, which SigLIP's tokenizer needs"
                )
            self._special_ids[piece] = i
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id = self._special_ids[self.pad_token]
        self.bos_id = None
        self.eos_id = self._special_ids[SIGLIP_EOS]
        self.unk_id = self._special_ids[SIGLIP_UNK]
        self._unk_len = len(self._sp.encode(SIGLIP_UNK, out_type=str))
        longest_first = sorted(self._special_ids, key=lambda t: (-len(t), t))
        self._split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")

    def __getstate__(self) -> dict[str, Any]:
        return dict(super().__getstate__(), pad_token=self.pad_token)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.pad_token = state["pad_token"]
        super().__setstate__(state)

    def _chunk_pieces(self, text: str) -> list[str]:
        text = re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()
        # Encoded behind `<unk>` (whose pieces are then dropped), so that a chunk that does not
        # start a word gets no word-boundary mark of its own.
        pieces = self._sp.encode(SIGLIP_UNK + text, out_type=str)
        return pieces[self._unk_len :] if len(pieces) >= self._unk_len else pieces

    def tokens(self, text: str) -> list[int]:
        """The ids of `text` alone: no `</s>`, no truncation."""
        # Odd places hold the special tokens. (They swallow the whitespace beside them, as the
        # canonicalisation's strip does anyway.)
        parts = self._split.split(_SPIECE_SPACE + text.replace(_SPIECE_SPACE, " "))
        pieces: list[str] = []
        for i, part in enumerate(parts):
            if i % 2:
                pieces.append(part)
            elif part:
                pieces.extend(self._chunk_pieces(part))
        if len(pieces) > 1 and pieces[0] == _SPIECE_SPACE and pieces[1] in self._special_ids:
            pieces = pieces[1:]
        return [self._special_ids[p] if p in self._special_ids else self._sp.piece_to_id(p) for p in pieces]

    def encode(self, texts: Sequence[str | bytes]) -> np.ndarray:
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self.tokens(_as_str(text))[: self.max_len - 1]
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._sp.decode([i for i in ids if i != self.pad_id])


GEMMA_EOS = "<eos>"
GEMMA_PAD = "<pad>"


class Siglip2SentencePieceTokenizer(SentencePieceTokenizer):
    """SigLIP 2's conventions on its Gemma `tokenizer.model` (a 256k BPE sentencepiece model), as
    big_vision trained it (`lower|tok(eos="sticky", pad_value=0)`): each text lower-cased, the
    model's own ids, no start token, `<eos>` last (kept when the text is cut), padding with
    `<pad>` (id 0). Special tokens written in the text are text: the ids of transformers'
    `Siglip2Tokenizer` called with `split_special_tokens=True`.
    """

    style = "siglip2"

    def _load(self, model_proto: bytes) -> None:
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._shift = 0
        for piece in (GEMMA_EOS, GEMMA_PAD):
            if self._sp.id_to_piece(self._sp.piece_to_id(piece)) != piece:
                raise ValueError(
                    f"sentencepiece model has no {piece!r} piece, which SigLIP 2's tokenizer needs"
                )
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id = self._sp.piece_to_id(GEMMA_PAD)
        self.bos_id = None
        self.eos_id = self._sp.piece_to_id(GEMMA_EOS)
        self.unk_id = self._sp.unk_id()

    def encode(self, texts: Sequence[str | bytes]) -> np.ndarray:
        rows = self._sp.encode([_as_str(t).lower() for t in texts], out_type=int)
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int32)
        for i, ids in enumerate(rows):
            ids = ids[: self.max_len - 1] + [self.eos_id]
            out[i, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        ids = ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids
        return self._sp.decode([i for i in ids if i != self.pad_id])


def _siglip2_conventions(tok) -> None:
    """SigLIP 2's conventions on a Gemma tokenizer.json, whatever the file's post-processor says:
    lower case before the file's own normaliser (transformers' `Siglip2Tokenizer`), no start
    token, `<eos>` appended (its `tokenizer_config.json`: add_bos_token false, add_eos_token true)."""
    from tokenizers import normalizers, processors

    eos_id = tok.token_to_id(GEMMA_EOS)
    if eos_id is None:
        raise ValueError(f"tokenizer.json has no {GEMMA_EOS!r} token, which SigLIP 2's tokenizer needs")
    lower = normalizers.Lowercase()
    tok.normalizer = normalizers.Sequence([lower, tok.normalizer]) if tok.normalizer else lower
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {GEMMA_EOS}", special_tokens=[(GEMMA_EOS, eos_id)]
    )


class HfTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), used as transformers does with
    `padding="max_length", truncation=True, max_length=max_len`.

    The file's normalizer, pre-tokenizer, model and post-processor (its special tokens) make the
    ids; the tokens are cut from the side the file's truncation names (default right) to leave
    room for the special tokens; padding to `max_len` with `pad_token` (default: the file's
    padding token; a file without one needs it) on the side the file's padding names.
    `bos_id` / `eos_id`: the special tokens the post-processor puts first / last, if any.
    `style='siglip2'`: SigLIP 2's conventions on its Gemma file (`_siglip2_conventions`; padding
    with `<pad>` unless `pad_token` says otherwise).
    """

    def __init__(
        self,
        tokenizer_file: str | None = None,
        max_len: int = 77,
        *,
        pad_token: str = "",
        tokenizer_json: str | None = None,
        style: str = "",
    ):
        if tokenizer_json is None:
            if not tokenizer_file or not paths.exists(tokenizer_file):
                raise FileNotFoundError(f"tokenizer.json file {tokenizer_file!r} does not exist")
            tokenizer_json = paths.read_bytes(tokenizer_file).decode("utf-8")
        self.tokenizer_file = tokenizer_file
        self.max_len = int(max_len)
        self.pad_token = pad_token
        self.style = style
        self._load(tokenizer_json)

    def _load(self, tokenizer_json: str) -> None:
        import tokenizers as hf_tokenizers  # the library (only this tokenizer needs it)

        self._json = tokenizer_json
        tok = hf_tokenizers.Tokenizer.from_str(tokenizer_json)
        padding, truncation = tok.padding, tok.truncation
        tok.no_padding()
        tok.no_truncation()
        if self.style == "siglip2":
            _siglip2_conventions(tok)
            # On the right, whatever the file says (Gemma's own default is the left), as trained.
            padding, truncation = {"pad_token": GEMMA_PAD}, None
        probe = tok.encode("a")
        mask = probe.special_tokens_mask
        self.bos_id = probe.ids[0] if mask and mask[0] else None
        self.eos_id = probe.ids[-1] if mask and mask[-1] else None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        pad_token = self.pad_token or (padding or {}).get("pad_token")
        if not pad_token:
            raise ValueError(
                "tokenizer.json names no padding token: set pad_token (data.tokenizer.pad_token)"
            )
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"padding token {pad_token!r} is not in the tokenizer.json vocabulary")
        self.pad_id = pad_id
        tok.enable_truncation(
            self.max_len,
            strategy="longest_first",
            direction=(truncation or {}).get("direction", "right").lower(),
        )
        tok.enable_padding(
            direction=(padding or {}).get("direction", "right").lower(),
            pad_id=pad_id,
            pad_type_id=(padding or {}).get("pad_type_id", 0),
            pad_token=pad_token,
            length=self.max_len,
        )
        self._tok = tok

    def __getstate__(self) -> dict[str, Any]:
        return {
            "tokenizer_json": self._json,
            "max_len": self.max_len,
            "pad_token": self.pad_token,
            "tokenizer_file": self.tokenizer_file,
            "style": self.style,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_len = state["max_len"]
        self.pad_token = state["pad_token"]
        self.tokenizer_file = state["tokenizer_file"]
        self.style = state["style"]
        self._load(state["tokenizer_json"])

    def encode(self, texts: Sequence[str | bytes]) -> np.ndarray:
        # One text at a time: no thread pool in the data loader's worker processes.
        return np.array([self._tok.encode(_as_str(t)).ids for t in texts], dtype=np.int32).reshape(
            len(texts), self.max_len
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=True)


def caption_normalization_rules() -> str:
    """SentencePiece normalisation rules (its TSV format: source code points, tab, target code
    points) that lower-case letters and set punctuation and symbols apart as words of their own.

    Why: a word model trained on captions without punctuation knows "seven" but not "seven.",
    and CLIP's prompt templates end in "." ("a photo of a {}."): every class name became the
    unknown token and zero-shot fell below chance. With these rules "A photo of a Seven." reads
    as "a photo of a seven .". The rules live in the trained model itself, so a checkpoint that
    embeds an older model (without them) keeps tokenizing as it was trained.
    """
    rules = []
    for code in range(0x21, 0x2070):
        char = chr(code)
        if unicodedata.category(char)[0] in "PS":
            rules.append(f"{code:X}\t20 {code:X} 20")
        elif len(char.lower()) == 1 and char.lower() != char:
            rules.append(f"{code:X}\t{ord(char.lower()):X}")
    return "\n".join(rules) + "\n"


def train_sentencepiece(
    texts: Sequence[str], model_prefix: str, vocab_size: int, model_type: str = "word"
) -> str:
    """Trains a model on `texts` in memory; writes `<model_prefix>.model`.

    `vocab_size` is an upper bound: small corpora (a few dozen distinct words)
    yield fewer pieces instead of failing. The model lower-cases and splits punctuation off
    words (`caption_normalization_rules`). Returns the model file path.
    """
    texts = [t for t in (_as_str(t) for t in texts) if t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as scratch:
        rules = os.path.join(scratch, "caption_rules.tsv")
        with open(rules, "w") as f:
            f.write(caption_normalization_rules())
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
            normalization_rule_tsv=rules,
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
            "sentencepiece",
            "`byte` (no vocabulary), `sentencepiece`, `clip_bpe` (OpenAI CLIP / open_clip's tokenizer) "
            "or `hf` (a Hugging Face tokenizer.json)",
            choices=("byte", "sentencepiece", "clip_bpe", "hf"),
        ),
        "max_len": Field(12, "context length in tokens (CLIP: 77, SigLIP: 64)", minimum=1),
        "vocab_size": Field(128, "sentencepiece: vocabulary size when trained on the captions", minimum=8),
        "model_file": Field(
            "", "sentencepiece: a trained .model file (empty: train on the captions, cached)"
        ),
        "model_type": Field(
            "word",
            "sentencepiece trained on the captions: `word` suits templated captions",
            choices=("word", "unigram", "bpe"),
        ),
        "style": Field(
            "clipjax",
            "sentencepiece: `clipjax` (pad 0, bos/eos of the model) or `siglip` (the ids of "
            "transformers' SiglipTokenizer on SigLIP's spiece.model, given as `model_file`); "
            "sentencepiece and hf: `siglip2` (SigLIP 2's Gemma tokenizer.model / tokenizer.json: lower "
            "case, `<eos>` appended, `<pad>` after it)",
            choices=("clipjax", "siglip", "siglip2"),
        ),
        "vocab_file": Field("", "clip_bpe: CLIP's merges file, bpe_simple_vocab_16e6.txt.gz"),
        "tokenizer_file": Field("", "hf: the tokenizer.json file"),
        "pad_token": Field(
            "",
            "hf and sentencepiece `siglip`: the padding token (empty: hf the file's padding token, "
            "`<pad>` with style `siglip2`; siglip `</s>`)",
        ),
    },
    doc="the tokenizer; files may be local or bucket URLs, and checkpoints embed them",
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
    it. With style='siglip': SiglipSentencePieceTokenizer(model_file), which must be given.
    kind='clip_bpe': ClipBpeTokenizer(vocab_file). kind='hf': HfTokenizer(tokenizer_file).
    A missing file is a FileNotFoundError naming its key; a file not given, a ConfigError.
    """
    values = SECTION.read(tokenizer_config, "data.tokenizer")
    kind = values["kind"]
    max_len = values["max_len"]
    if kind == "byte":
        return ByteTokenizer(max_len)
    if kind == "clip_bpe":
        from clipjax.data.clip_bpe import ClipBpeTokenizer

        return ClipBpeTokenizer(_given_file(values, "vocab_file", kind), max_len)
    if kind == "hf":
        style = "siglip2" if values["style"] == "siglip2" else ""
        return HfTokenizer(
            _given_file(values, "tokenizer_file", kind), max_len, pad_token=values["pad_token"], style=style
        )
    if values["style"] == "siglip":
        model_file = _given_file(values, "model_file", "sentencepiece with style 'siglip'")
        return SiglipSentencePieceTokenizer(model_file, max_len, pad_token=values["pad_token"])
    if values["style"] == "siglip2":
        model_file = _given_file(values, "model_file", "sentencepiece with style 'siglip2'")
        return Siglip2SentencePieceTokenizer(model_file, max_len)

    model_file = values["model_file"]
    if model_file:
        return SentencePieceTokenizer(_existing(model_file, "model_file"), max_len)

    if texts_for_training is None:
        raise ValueError("sentencepiece tokenizer without model_file needs texts_for_training")
    vocab_size = values["vocab_size"]
    model_type = values["model_type"]
    texts = [_as_str(t) for t in texts_for_training]
    digest = hashlib.sha1(f"{model_type}|{vocab_size}|v2\n".encode())
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


def _existing(path: str, key: str) -> str:
    path = paths.resolve(path)
    if not paths.exists(path):  # a local file or a bucket URL
        raise FileNotFoundError(f"data.tokenizer.{key}: {path!r} does not exist")
    return path


def _given_file(values: dict, key: str, what: str) -> str:
    if not values[key]:
        raise ConfigError(f"data.tokenizer.{key}: must be set for tokenizer kind {what}")
    return _existing(values[key], key)


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


def _packed(data: bytes) -> str:
    return base64.b64encode(gzip.compress(data, mtime=0)).decode("ascii")


def _unpacked(text: str) -> bytes:
    return gzip.decompress(base64.b64decode(text))


def tokenizer_to_json(tokenizer) -> dict[str, Any]:
    """Everything needed to rebuild `tokenizer` without its training data or files (checkpoints
    store this, so a moved or grown dataset cannot change what token ids mean)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte", "max_len": tokenizer.max_len}
    if isinstance(tokenizer, HfTokenizer):
        saved = {
            "kind": "hf",
            "max_len": tokenizer.max_len,
            "pad_token": tokenizer.pad_token,
            "tokenizer_json_gz": _packed(tokenizer._json.encode("utf-8")),
        }
        return dict(saved, style=tokenizer.style) if tokenizer.style else saved
    if isinstance(tokenizer, SentencePieceTokenizer):
        saved = {
            "kind": "sentencepiece",
            "max_len": tokenizer.max_len,
            "model_proto": base64.b64encode(tokenizer._proto).decode("ascii"),
        }
        if isinstance(tokenizer, SiglipSentencePieceTokenizer):
            saved.update(style="siglip", pad_token=tokenizer.pad_token)
        if isinstance(tokenizer, Siglip2SentencePieceTokenizer):
            saved.update(style="siglip2")
        return saved
    from clipjax.data.clip_bpe import ClipBpeTokenizer

    if isinstance(tokenizer, ClipBpeTokenizer):
        # The merges in use only (the file's tail is never read): about 200 KB.
        return {
            "kind": "clip_bpe",
            "max_len": tokenizer.max_len,
            "merges_gz": _packed(tokenizer.merges_text.encode("utf-8")),
        }
    raise TypeError(f"cannot store a tokenizer of type {type(tokenizer).__name__}")


def tokenizer_from_json(saved: dict[str, Any]):
    kind = saved["kind"]
    if kind == "byte":
        return ByteTokenizer(saved["max_len"])
    if kind == "clip_bpe":
        from clipjax.data.clip_bpe import ClipBpeTokenizer

        return ClipBpeTokenizer(
            max_len=saved["max_len"], merges_text=_unpacked(saved["merges_gz"]).decode("utf-8")
        )
    if kind == "hf":
        return HfTokenizer(
            max_len=saved["max_len"],
            pad_token=saved["pad_token"],
            tokenizer_json=_unpacked(saved["tokenizer_json_gz"]).decode("utf-8"),
            style=saved.get("style", ""),
        )
    proto = base64.b64decode(saved["model_proto"])
    if saved.get("style", "clipjax") == "siglip":
        return SiglipSentencePieceTokenizer(
            max_len=saved["max_len"], model_proto=proto, pad_token=saved["pad_token"]
        )
    if saved.get("style") == "siglip2":
        return Siglip2SentencePieceTokenizer(max_len=saved["max_len"], model_proto=proto)
    return SentencePieceTokenizer(max_len=saved["max_len"], model_proto=proto)
