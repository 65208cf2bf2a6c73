"""Evaluators against brute-force computations."""

import numpy as np

from clipjax.evals.retrieval import retrieval_metrics
from clipjax.evals.zero_shot import class_embeddings, zero_shot_accuracy


def _brute_recall(sim, hit, k):
    found = 0
    for i in range(sim.shape[0]):
        top = sorted(range(sim.shape[1]), key=lambda j: -sim[i, j])[:k]
        found += any(hit[i, j] for j in top)
    return found / sim.shape[0]


def test_retrieval_matches_brute_force():
    rng = np.random.default_rng(0)
    n, d = 40, 8
    img = rng.normal(size=(n, d))
    txt = img + rng.normal(size=(n, d))
    concept = rng.integers(0, 6, size=n)
    result = retrieval_metrics(img, txt, concept)
    sim = img @ txt.T
    concept_hit = concept[:, None] == concept[None, :]
    for k in (1, 5, 10):
        assert result["image_to_text"][f"R@{k}"] == _brute_recall(sim, concept_hit, k)
        assert result["text_to_image"][f"R@{k}"] == _brute_recall(sim.T, concept_hit.T, k)
        assert result["strict"]["image_to_text"][f"R@{k}"] == _brute_recall(sim, np.eye(n, dtype=bool), k)
    # Concept-aware retrieval can only find more hits than strict retrieval.
    assert result["image_to_text"]["R@1"] >= result["strict"]["image_to_text"]["R@1"]


def test_retrieval_without_concepts_is_strict():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(10, 4))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    result = retrieval_metrics(img, img, None)
    assert result["image_to_text"]["R@1"] == 1.0
    assert result["image_to_text"] == result["strict"]["image_to_text"]


def test_zero_shot_on_known_embeddings():
    # Three classes along the axes; prompts embed to their class axis plus template noise.
    axes = np.eye(3)
    names = ["a", "b", "c"]

    def encode(prompts):
        return np.stack([axes[names.index(p.split()[-1])] + 0.1 * (len(p) % 3) for p in prompts])

    classes = class_embeddings(encode, names, ["x {}", "yy {}"])
    np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0, rtol=1e-6)
    labels = np.array([0, 1, 2, 2])
    images = axes[[0, 1, 2, 0]]  # the last image is misclassified on purpose
    acc = zero_shot_accuracy(images, classes, labels)
    assert acc["top1"] == 0.75
