"""Image <-> text retrieval recall@K, concept-aware and strict.

Concept-aware: a retrieved item is a hit when it shows the same concept as the query (equal
concept labels), because a dataset with recurring captions has many correct answers per query.
Strict: only the query's own paired item counts (the usual one-caption-per-image protocol).
`multi_caption_retrieval` covers several captions per image (COCO 5k / Flickr30k 1k), with
pessimistic tie handling and bounded memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from clipjax.evals.base import Evaluator, register_evaluator
from clipjax.evals.embed import gather_rows, process_share


_CHUNK_BYTES = 64 * 2**20


def _ranks_of_first_hit(similarity: np.ndarray, is_hit: np.ndarray) -> np.ndarray:
    """0-based rank of the best-ranked hit for each query row."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits_in_order = np.take_along_axis(is_hit, order, axis=1)
    return np.argmax(hits_in_order, axis=1)


def _recalls(ranks: np.ndarray, ks: Sequence[int]) -> dict:
    out = {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
    out["median_rank"] = float(np.median(ranks) + 1)
    return out


def recall_at_k(similarity: np.ndarray, is_hit: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    return _recalls(_ranks_of_first_hit(similarity, is_hit), ks)


def _ranks(queries: np.ndarray, candidates: np.ndarray, concept: np.ndarray | None) -> np.ndarray:
    """The rank of each query's first hit (its own pair, or with `concept` any candidate of its
    concept). Every process ranks its share of the queries, a few at a time, and the ranks are
    gathered: a host holds both sides' embeddings (small: d floats an example, and every
    query's rank needs all candidates) and [few queries, N] similarities, never [N, N]."""
    share = process_share(len(queries))
    own = np.arange(len(candidates)) if concept is None else concept
    step = max(1, _CHUNK_BYTES // (32 * max(1, len(candidates))))  # similarities, order, hits
    ranks = [np.zeros(0, np.int64)]
    for a in range(share.rows.start, share.rows.stop, step):
        b = min(a + step, share.rows.stop)
        ranks.append(_ranks_of_first_hit(queries[a:b] @ candidates.T, own[a:b, None] == own[None, :]))
    return gather_rows(np.concatenate(ranks))


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, concept: np.ndarray | None, ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """Row i of image_emb and text_emb are a pair; `concept` gives each pair's concept label."""
    result = {
        "strict": {
            "image_to_text": _recalls(_ranks(image_emb, text_emb, None), ks),
            "text_to_image": _recalls(_ranks(text_emb, image_emb, None), ks),
        }
    }
    if concept is not None and np.all(concept >= 0):
        result["image_to_text"] = _recalls(_ranks(image_emb, text_emb, concept), ks)
        result["text_to_image"] = _recalls(_ranks(text_emb, image_emb, concept), ks)
    else:
        result["image_to_text"] = result["strict"]["image_to_text"]
        result["text_to_image"] = result["strict"]["text_to_image"]
    return result


@register_evaluator
class RetrievalEvaluator(Evaluator):
    """Image <-> text recall@K on the held-out pairs, concept-aware and strict."""

    kind = "retrieval"

    def run(self, encoders):
        image_emb, text_emb = self.data.heldout_embeddings(encoders)
        concept = self.data.heldout_fields.get("label")
        return {
            "num_examples": int(len(image_emb)),
            "retrieval": retrieval_metrics(image_emb, text_emb, concept),
        }


def _similarity(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """One chunk of query rows against all candidates: the only [chunk, candidates] float array."""
    return queries @ candidates.T


def _rank_summary(ranks: np.ndarray, ks: Sequence[int]) -> dict:
    return {**_recalls(ranks, ks), "mean_rank": float(np.mean(ranks) + 1)}


def _check_multi_caption_inputs(image_emb, text_emb, caption_image, ks, chunk):
    image_emb, text_emb, caption_image = (
        np.asarray(image_emb),
        np.asarray(text_emb),
        np.asarray(caption_image),
    )
    if image_emb.ndim != 2 or image_emb.shape[0] == 0:
        raise ValueError(f"image_emb: expected a non-empty [N, d] array, got shape {image_emb.shape}")
    n, d = image_emb.shape
    if text_emb.ndim != 2 or text_emb.shape[0] == 0 or text_emb.shape[1] != d:
        raise ValueError(
            f"text_emb: expected a non-empty [M, {d}] array (d of image_emb), got {text_emb.shape}"
        )
    m = text_emb.shape[0]
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
            raise ValueError(f"{name}: expected a real numeric array, got dtype {emb.dtype}")
        if not np.all(np.isfinite(emb)):
            raise ValueError(f"{name}: contains NaN or infinite values")
    if caption_image.shape != (m,):
        raise ValueError(
            f"caption_image: expected shape [M] = ({m},) (rows of text_emb), got {caption_image.shape}"
        )
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(f"caption_image: expected integer image indices, got dtype {caption_image.dtype}")
    bad = np.flatnonzero((caption_image < 0) | (caption_image >= n))
    if bad.size:
        raise ValueError(
            f"caption_image: caption {bad[0]} points at image {caption_image[bad[0]]}, outside [0, {n})"
        )
    caption_image = caption_image.astype(np.int64)
    missing = np.flatnonzero(np.bincount(caption_image, minlength=n) == 0)
    if missing.size:
        raise ValueError(
            f"caption_image: image {missing[0]} has no caption ({missing.size} such images); "
            "every image must have at least one caption to be a query"
        )
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive integers, got {ks}")
    if chunk is not None and (
        isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1
    ):
        raise ValueError(f"chunk: expected a positive integer or None, got {chunk!r}")
    return image_emb, text_emb, caption_image, ks


def multi_caption_retrieval(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk: int | None = None,
) -> dict:
    """Image <-> text recall@K with several captions per image (COCO 5k / Flickr30k 1k protocol).

    image_emb [N, d] and text_emb [M, d] are unit-norm embeddings (similarity = dot product);
    caption_image [M] gives the image index of each caption, and every image needs >= 1 caption.

    image -> text: each image is a query over all M captions; a hit is any of its own captions.
    text -> image: each caption is a query over all N images; the hit is its own image.

    Tie rule (pessimistic, deterministic): the 0-based rank of a query is the number of non-hit
    candidates whose similarity is >= the best hit's similarity (for image -> text the best hit
    is the max over the image's captions). So a tie with a non-hit always counts against the
    query, and constant embeddings give R@1 = 0 rather than depending on index order.
    R@k = fraction of queries with rank < k; median_rank and mean_rank are 1-based.

    Memory: at most `chunk` query rows x all candidates of similarities exist at once (default:
    about 64 MiB of them); ranks are counted per chunk without sorting.

    Returns {"image_to_text": {"R@k"..., "median_rank", "mean_rank"}, "text_to_image": {...},
    "num_images": N, "num_captions": M}.
    """
    image_emb, text_emb, caption_image, ks = _check_multi_caption_inputs(
        image_emb, text_emb, caption_image, ks, chunk
    )
    n, m = image_emb.shape[0], text_emb.shape[0]
    dtype = np.result_type(image_emb.dtype, text_emb.dtype, np.float32)
    image_emb, text_emb = image_emb.astype(dtype, copy=False), text_emb.astype(dtype, copy=False)
    if chunk is None:
        chunk = max(1, _CHUNK_BYTES // (dtype.itemsize * max(n, m)))

    # image -> text. Captions grouped by image (stable) so each image chunk owns a contiguous run.
    order = np.argsort(caption_image, kind="stable")
    sorted_image = caption_image[order]
    starts = np.searchsorted(sorted_image, np.arange(n + 1))  # captions of image i: starts[i]:starts[i+1]
    i2t_ranks = np.empty(n, dtype=np.int64)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        sim = _similarity(image_emb[a:b], text_emb)  # [c, M]
        s, e = starts[a], starts[b]
        hit_scores = sim[sorted_image[s:e] - a, order[s:e]]  # each caption's score against its own image
        seg = starts[a:b] - s  # every image has >= 1 caption, so the segments are non-empty
        best = np.maximum.reduceat(hit_scores, seg)
        hits_at_best = np.add.reduceat(hit_scores >= np.repeat(best, np.diff(starts[a : b + 1])), seg)
        i2t_ranks[a:b] = np.count_nonzero(sim >= best[:, None], axis=1) - hits_at_best

    # text -> image: one hit per query, which is itself counted by the >= comparison.
    t2i_ranks = np.empty(m, dtype=np.int64)
    for a in range(0, m, chunk):
        b = min(a + chunk, m)
        sim = _similarity(text_emb[a:b], image_emb)  # [c, N]
        best = sim[np.arange(b - a), caption_image[a:b]]
        t2i_ranks[a:b] = np.count_nonzero(sim >= best[:, None], axis=1) - 1

    return {
        "image_to_text": _rank_summary(i2t_ranks, ks),
        "text_to_image": _rank_summary(t2i_ranks, ks),
        "num_images": int(n),
        "num_captions": int(m),
    }
