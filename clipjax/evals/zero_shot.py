"""Zero-shot classification: class names x prompt templates, averaged into one classifier per class."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(encode_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """[C, d]: the mean of each class's normalised prompt embeddings, renormalised (CLIP's recipe)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = _normalize(encode_texts(prompts)).reshape(len(class_names), len(templates), -1)
    return _normalize(emb.mean(axis=1))


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> dict:
    """top-1, top-5 (when there are more than 5 classes) and per-class top-1 accuracy."""
    scores = image_emb @ class_emb.T
    order = np.argsort(-scores, axis=1)
    result = {"top1": float(np.mean(order[:, 0] == labels))}
    if class_emb.shape[0] > 5:
        result["top5"] = float(np.mean(np.any(order[:, :5] == labels[:, None], axis=1)))
    return result


def per_class_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                       class_names: Sequence[str]) -> dict[str, float]:
    predicted = np.argmax(image_emb @ class_emb.T, axis=1)
    return {name: float(np.mean(predicted[labels == c] == c)) for c, name in enumerate(class_names)
            if np.any(labels == c)}
