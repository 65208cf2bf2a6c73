"""CLIP's byte-level BPE tokenizer: the token ids OpenAI CLIP and open_clip models were trained with.

What it does, step by step (the behaviour of `open_clip.tokenize` / OpenAI CLIP's `clip.tokenize`):

1. Clean-up: ftfy's `fix_text` (mojibake, odd quotes, control characters), HTML entities
   unescaped twice (so `&amp;amp;` becomes `&`), whitespace runs collapsed to one space and the
   ends stripped, then lower-casing.
2. Pre-tokenisation: a regex cuts the text into the special tokens written out in the text,
   the English contractions ('s 't 're 've 'm 'll 'd), runs of letters, single digits, and runs
   of anything else but whitespace; the whitespace itself is dropped.
3. Each piece is written as UTF-8 and every byte replaced by a printable character (the GPT-2
   byte table, below), so any text has a spelling in the vocabulary.
4. Byte-pair merges: the piece starts as its characters, the last one marked with `</w>` (end of
   word); the adjacent pair with the lowest merge rank is fused everywhere (left to right), and
   again, until no pair has a rank. Each resulting symbol is one token.
5. `<start_of_text>` + tokens + `<end_of_text>`; longer than the context: cut to the context
   length with `<end_of_text>` written over the last place; shorter: padded with id 0.

The vocabulary file is CLIP's `bpe_simple_vocab_16e6.txt.gz`: a header line, then one merge per
line ("a b"). The vocabulary is the 256 byte characters, the same with `</w>`, one entry per merge
used (48,894 of them; a shorter file gives fewer), then `<start_of_text>` and `<end_of_text>`
(49406 and 49407 with the full file).

Padding: CLIP pads with id 0, which is also a real token ("!"). `pad_id` is 0 here, but a model
must not take id 0 inside the text for padding: the text ends at the first `<end_of_text>`
(`eos_id`), the way CLIP pools at the end-of-text position.
"""

from __future__ import annotations

import gzip
import html
from typing import Any, Sequence

import ftfy
import numpy as np
import regex

from clipjax import paths

NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49152 entries less the 256 bytes and the 2 specials
START = "<start_of_text>"
END = "<end_of_text>"
WORD_END = "</w>"
_CACHE_LIMIT = 200_000  # cached piece -> tokens; cleared when full so a long run's memory stays bounded


def byte_characters() -> list[str]:
    """The character that stands for each byte value 0..255 (GPT-2's byte table).

    Bytes that are printable Latin-1 characters (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for
    themselves; the others (control characters, space, and a few) get the characters from
    U+0100 on, in byte order.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table = []
    extra = 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


def _base_symbols() -> list[str]:
    """The first 256 vocabulary entries: the printable bytes' characters, then the others."""
    table = byte_characters()
    return [table[b] for b in range(256) if ord(table[b]) < 256] + [
        table[b] for b in range(256) if ord(table[b]) >= 256
    ]


def clean_text(text: str) -> str:
    """CLIP's clean-up: ftfy, HTML entities (twice), whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _merges_text(data: bytes) -> str:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8")


class ClipBpeTokenizer:
    """CLIP's tokenizer from its merges file (`bpe_simple_vocab_16e6.txt.gz`, local or a bucket URL).

    `max_len` is the context length (CLIP: 77). `pad_id` is 0 although 0 is the token "!": a
    model must find the end of the text from `eos_id`, never treat id 0 inside the text as
    padding. `merges_text` (the file's text) stands in for the file.
    """

    pad_id = 0

    def __init__(self, vocab_file: str | None = None, max_len: int = 77, *, merges_text: str | None = None):
        if merges_text is None:
            if not vocab_file or not paths.exists(vocab_file):
                raise FileNotFoundError(f"CLIP vocabulary file {vocab_file!r} does not exist")
            merges_text = _merges_text(paths.read_bytes(vocab_file))
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (start and end of text), got {max_len}")
        self.vocab_file = vocab_file
        self.max_len = int(max_len)
        self._load(merges_text)

    def _load(self, merges_text: str) -> None:
        # The header line, then the merges actually used; what follows them is never read.
        lines = merges_text.split("\n")[1 : 1 + NUM_MERGES]
        self.merges_text = "\n".join(merges_text.split("\n")[: 1 + NUM_MERGES])
        table = byte_characters()
        self._byte_chars = table
        base = _base_symbols()
        entries = base + [s + WORD_END for s in base]
        ranks: dict[tuple[str, ...], int] = {}
        for rank, line in enumerate(lines):
            parts = tuple(line.split())
            entries.append("".join(parts))
            ranks[parts] = rank
        entries += [START, END]
        # A string listed twice keeps its last id (never the case in CLIP's file).
        self._ids = {s: i for i, s in enumerate(entries)}
        self._entries = entries
        self._ranks = ranks
        self.vocab_size = len(entries)
        self.bos_id = self._ids[START]
        self.eos_id = self._ids[END]
        specials = "|".join(regex.escape(s) for s in (START, END))
        self._pattern = regex.compile(
            specials + r"|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE
        )
        self._cache: dict[str, list[int]] = {}

    # Only the text travels to grain worker processes; the tables are rebuilt there.
    def __getstate__(self) -> dict[str, Any]:
        return {"merges_text": self.merges_text, "max_len": self.max_len, "vocab_file": self.vocab_file}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_len = state["max_len"]
        self.vocab_file = state["vocab_file"]
        self._load(state["merges_text"])

    def _merge(self, symbols: list[str]) -> list[str]:
        ranks = self._ranks
        while len(symbols) > 1:
            best = None
            best_rank = None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            fused = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    fused.append(first + second)
                    i += 2
                else:
                    fused.append(symbols[i])
                    i += 1
            symbols = fused
        return symbols

    def _piece_ids(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        if piece in (START, END):
            ids = [self._ids[piece]]
        else:
            chars = [self._byte_chars[b] for b in piece.encode("utf-8")]
            chars[-1] += WORD_END
            ids = [self._ids[s] for s in self._merge(chars)]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def tokens(self, text: str) -> list[int]:
        """The ids of `text` alone: no start/end of text, no truncation."""
        out: list[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            out.extend(self._piece_ids(piece))
        return out

    def encode(self, texts: Sequence[str | bytes]) -> np.ndarray:
        out = np.zeros((len(texts), self.max_len), dtype=np.int32)
        for i, text in enumerate(texts):
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            row = [self.bos_id] + self.tokens(text)[: self.max_len - 2] + [self.eos_id]
            out[i, : len(row)] = row
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """The text of one row: what lies between start and the first end of text."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        symbols = "".join(self._entries[i] for i in ids if i not in (self.bos_id, self.eos_id))
        byte_of = {c: b for b, c in enumerate(self._byte_chars)}
        data = bytearray()
        for word in symbols.split(WORD_END):
            data.extend(byte_of[c] for c in word)
            data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()
