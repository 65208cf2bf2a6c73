"""Multi-caption image <-> text retrieval against a brute-force reference with the pessimistic tie rule."""

import statistics

import numpy as np
import pytest

from clipjax.evals import retrieval
from clipjax.evals.retrieval import multi_caption_retrieval, recall_at_k, retrieval_metrics

CHUNKS = (1, 7, 1000, None)  # one row at a time, a size dividing neither N nor M, one chunk, the default


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _summary(ranks, ks):
    out = {f"R@{k}": sum(r < k for r in ranks) / len(ranks) for k in ks}
    out["median_rank"] = statistics.median(ranks) + 1
    out["mean_rank"] = sum(ranks) / len(ranks) + 1
    return out


def _brute_ranks(img, txt, cap, *, optimistic=False, first_caption_only=False):
    """0-based ranks by the rule itself: how many non-hits score >= the best hit (> if optimistic)."""
    img, txt, cap = img.tolist(), txt.tolist(), cap.tolist()
    beats = (lambda s, best: s > best) if optimistic else (lambda s, best: s >= best)
    i2t = []
    for i in range(len(img)):
        scores = [_dot(img[i], t) for t in txt]
        hits = [j for j in range(len(txt)) if cap[j] == i]
        if first_caption_only:
            hits = hits[:1]  # the other captions of image i then count as misses
        best = max(scores[j] for j in hits)
        i2t.append(sum(1 for j in range(len(txt)) if j not in hits and beats(scores[j], best)))
    t2i = []
    for j in range(len(txt)):
        scores = [_dot(txt[j], v) for v in img]
        best = scores[cap[j]]
        t2i.append(sum(1 for i in range(len(img)) if i != cap[j] and beats(scores[i], best)))
    return i2t, t2i


def _brute(img, txt, cap, ks, **kw):
    i2t, t2i = _brute_ranks(img, txt, cap, **kw)
    return {"image_to_text": _summary(i2t, ks), "text_to_image": _summary(t2i, ks)}


def _dyadic(x, steps=4096):
    # On a 1/4096 grid every dot product is exact in float64, so chunked BLAS and python loops agree bit for bit.
    return np.round(np.asarray(x, dtype=np.float64) * steps) / steps


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_case(seed, counts, d=16, noise=2.0):
    rng = np.random.default_rng(seed)
    n = len(counts)
    cap = rng.permutation(np.repeat(np.arange(n), counts))  # captions not grouped by image
    img = _unit(rng.normal(size=(n, d)))
    txt = _unit(img[cap] + noise * rng.normal(size=(len(cap), d)) / np.sqrt(d))
    return _dyadic(img), _dyadic(txt), cap


def _check_against_brute(img, txt, cap, chunks=CHUNKS):
    # ks = every possible cut-off: equal R@k for all k means equal multisets of ranks.
    ks = tuple(range(1, max(len(img), len(txt)) + 2))
    expected = _brute(img, txt, cap, ks)
    for chunk in chunks:
        got = multi_caption_retrieval(img, txt, cap, ks, chunk=chunk)
        assert got["num_images"] == len(img) and got["num_captions"] == len(txt)
        for direction in ("image_to_text", "text_to_image"):
            assert got[direction] == expected[direction], (direction, chunk)
    return expected


def test_five_captions_per_image_matches_brute_force():
    img, txt, cap = _random_case(0, [5] * 60)
    expected = _check_against_brute(img, txt, cap)
    r1 = expected["image_to_text"]["R@1"]
    assert 0.2 < r1 < 0.9 and 0.1 < expected["text_to_image"]["R@1"] < 0.9  # not a degenerate case
    default = multi_caption_retrieval(img, txt, cap)
    assert set(default["image_to_text"]) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
    assert set(default["text_to_image"]) == set(default["image_to_text"])
    # Without ties, the existing argsort-based recall over the full hit matrix gives the same numbers.
    sim = img @ txt.T
    is_hit = cap[None, :] == np.arange(len(img))[:, None]
    assert recall_at_k(sim, is_hit)["R@1"] == default["image_to_text"]["R@1"]
    assert recall_at_k(sim.T, is_hit.T)["R@5"] == default["text_to_image"]["R@5"]


def test_varying_captions_per_image_matches_brute_force():
    counts = np.random.default_rng(1).integers(1, 8, size=50)
    assert counts.min() == 1 and counts.max() == 7
    img, txt, cap = _random_case(2, counts)
    _check_against_brute(img, txt, cap)


def test_counting_only_the_first_caption_is_detected():
    img, txt, cap = _random_case(0, [5] * 60)
    right = multi_caption_retrieval(img, txt, cap, chunk=7)["image_to_text"]["R@1"]
    first_only = _brute(img, txt, cap, (1,), first_caption_only=True)["image_to_text"]["R@1"]
    assert right - first_only > 0.1, (right, first_only)


def test_exact_ties_match_brute_force():
    rng = np.random.default_rng(3)
    n, d = 40, 3
    cap = rng.permutation(np.repeat(np.arange(n), rng.integers(1, 6, size=n)))
    img = rng.integers(-1, 2, size=(n, d)).astype(np.float64)
    other = rng.integers(-1, 2, size=(len(cap), d)).astype(np.float64)
    txt = np.where(rng.random(size=(len(cap), 1)) < 0.6, img[cap], other)
    sim = img @ txt.T
    assert len(np.unique(sim)) <= 7  # values in -3..3: ties everywhere
    expected = _check_against_brute(img, txt, cap)
    # The data tells the tie rules apart, and the argsort (index-order) tie breaking differs as well.
    optimistic = _brute(img, txt, cap, (1,), optimistic=True)
    for direction in ("image_to_text", "text_to_image"):
        assert optimistic[direction]["R@1"] > expected[direction]["R@1"]
    is_hit = cap[None, :] == np.arange(n)[:, None]
    assert recall_at_k(sim, is_hit)["R@1"] != expected["image_to_text"]["R@1"]


def test_constant_embeddings_score_zero():
    n, d = 12, 4
    cap = np.repeat(np.arange(n), 3)
    img = np.full((n, d), 0.5)
    txt = np.full((len(cap), d), 0.5)
    got = multi_caption_retrieval(img, txt, cap, (1, 5, 10), chunk=5)
    for direction in ("image_to_text", "text_to_image"):
        assert got[direction]["R@1"] == got[direction]["R@5"] == got[direction]["R@10"] == 0.0
    assert got["image_to_text"]["median_rank"] == len(cap) - 3 + 1  # behind every other image's captions
    assert got["text_to_image"]["mean_rank"] == n  # behind every other image
    _check_against_brute(img, txt, cap, chunks=(1, 5))


def test_perfect_model_scores_one():
    rng = np.random.default_rng(4)
    n = 30
    cap = rng.permutation(np.repeat(np.arange(n), rng.integers(1, 8, size=n)))
    img = _unit(rng.normal(size=(n, 32))).astype(np.float32)
    got = multi_caption_retrieval(img, img[cap], cap, chunk=4)
    for direction in ("image_to_text", "text_to_image"):
        assert got[direction]["R@1"] == 1.0
        assert got[direction]["median_rank"] == got[direction]["mean_rank"] == 1.0


def test_one_caption_per_image_equals_strict_retrieval():
    rng = np.random.default_rng(5)
    n, d = 50, 16
    img = _dyadic(_unit(rng.normal(size=(n, d))))
    txt = _dyadic(_unit(img + 0.8 * rng.normal(size=(n, d)) / np.sqrt(d)))
    sim = img @ txt.T
    assert all(len(np.unique(row)) == n for row in sim) and all(len(np.unique(c)) == n for c in sim.T)
    ks = (1, 2, 5, 10, 20)
    strict = retrieval_metrics(img, txt, None, ks)["strict"]
    for chunk in (1, 7, None):
        got = multi_caption_retrieval(img, txt, np.arange(n), ks, chunk=chunk)
        for direction in ("image_to_text", "text_to_image"):
            assert {k: got[direction][k] for k in strict[direction]} == strict[direction]
    assert 0 < strict["image_to_text"]["R@1"] < 1


def test_default_chunk_follows_the_memory_budget(monkeypatch):
    img, txt, cap = _random_case(6, [2, 3, 1, 4, 2, 5, 1, 3])  # M = 21 captions
    expected = multi_caption_retrieval(img, txt, cap, chunk=1000)
    # A budget of 3 rows of float64 similarities -> chunks of 3 rows, which divide neither N nor M.
    monkeypatch.setattr(retrieval, "_CHUNK_BYTES", 3 * 8 * len(cap))
    shapes = []
    original = retrieval._similarity

    def spy(queries, candidates):
        out = original(queries, candidates)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(retrieval, "_similarity", spy)
    got = multi_caption_retrieval(img, txt, cap)
    assert got == expected
    n, m = len(img), len(txt)
    assert shapes == [(3, m), (3, m), (2, m)] + [(3, n)] * 7, shapes


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.ones((3, 4)), np.ones((5, 3)), np.zeros(5, int)), "text_emb"),
        ((np.ones(4), np.ones((5, 4)), np.zeros(5, int)), "image_emb"),
        ((np.ones((3, 4)), np.ones((5, 4)), np.zeros(4, int)), "caption_image"),
        ((np.ones((3, 4)), np.ones((5, 4)), np.zeros(5)), "caption_image: expected integer"),
        (
            (np.ones((3, 4)), np.ones((3, 4)), np.array([0, 1, 3])),
            "caption_image: caption 2 points at image 3",
        ),
        ((np.ones((3, 4)), np.ones((3, 4)), np.array([0, -1, 2])), "caption_image: caption 1"),
        ((np.ones((3, 4)), np.ones((3, 4)), np.array([0, 0, 2])), "caption_image: image 1 has no caption"),
        ((np.full((3, 4), np.nan), np.ones((3, 4)), np.arange(3)), "image_emb: contains NaN"),
    ],
)
def test_bad_inputs_raise(args, message):
    with pytest.raises(ValueError, match=message):
        multi_caption_retrieval(*args)


def test_bad_options_raise():
    img, txt, cap = np.ones((2, 3)), np.ones((2, 3)), np.arange(2)
    with pytest.raises(ValueError, match="chunk"):
        multi_caption_retrieval(img, txt, cap, chunk=0)
    with pytest.raises(ValueError, match="ks"):
        multi_caption_retrieval(img, txt, cap, ks=(0, 5))
