"""What a caption is, for every layer: its text from stored bytes and its id.

`text_id` marks true positives in a batch: two captions with the same id (the same words after
normalisation) are not negatives of each other.
"""

from __future__ import annotations

import re
import zlib

_PUNCT = re.compile(r"[^\w\s]+", flags=re.UNICODE)
_SPACE = re.compile(r"\s+", flags=re.UNICODE)


def decode_caption(caption: bytes | None) -> str | None:
    """UTF-8 caption bytes -> stripped text; None when missing, empty or not UTF-8."""
    if caption is None:
        return None
    try:
        text = caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def normalize_caption(s: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed."""
    s = _PUNCT.sub(" ", s.lower())
    return _SPACE.sub(" ", s).strip()


def caption_text_id(s: str) -> int:
    """Stable non-negative int32 id of the normalised caption.

    crc32 rather than hash(): Python salts str hashes per process, and the id
    must agree across hosts and runs (it marks duplicate captions in a batch).
    """
    return zlib.crc32(normalize_caption(s).encode("utf-8")) & 0x7FFFFFFF
