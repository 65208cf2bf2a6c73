"""Image <-> text retrieval recall@K, concept-aware and strict.

Concept-aware: a retrieved item is a hit when it shows the same concept as the query (equal
concept labels), because a dataset with recurring captions has many correct answers per query.
Strict: only the query's own paired item counts (the usual one-caption-per-image protocol).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from clipjax.evals.base import Evaluator, register_evaluator


def _ranks_of_first_hit(similarity: np.ndarray, is_hit: np.ndarray) -> np.ndarray:
    """0-based rank of the best-ranked hit for each query row."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits_in_order = np.take_along_axis(is_hit, order, axis=1)
    return np.argmax(hits_in_order, axis=1)


def recall_at_k(similarity: np.ndarray, is_hit: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    ranks = _ranks_of_first_hit(similarity, is_hit)
    out = {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
    out["median_rank"] = float(np.median(ranks) + 1)
    return out


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, concept: np.ndarray | None, ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """Row i of image_emb and text_emb are a pair; `concept` gives each pair's concept label."""
    similarity = image_emb @ text_emb.T
    n = similarity.shape[0]
    strict_hit = np.eye(n, dtype=bool)
    result = {
        "strict": {
            "image_to_text": recall_at_k(similarity, strict_hit, ks),
            "text_to_image": recall_at_k(similarity.T, strict_hit, ks),
        }
    }
    if concept is not None and np.all(concept >= 0):
        concept_hit = concept[:, None] == concept[None, :]
        result["image_to_text"] = recall_at_k(similarity, concept_hit, ks)
        result["text_to_image"] = recall_at_k(similarity.T, concept_hit, ks)
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
        concept = self.data.heldout.get("label")
        return {
            "num_examples": int(len(image_emb)),
            "retrieval": retrieval_metrics(image_emb, text_emb, concept),
        }
