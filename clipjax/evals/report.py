"""The evaluation report: zero-shot per attribute and retrieval, as one nested dict.

report.json format (stable; scripts read it):
  step: int, num_examples: int
  zero_shot.<attribute>.top1 (and .top5 with more than 5 classes, .per_class.<name>), zero_shot.mean_top1
  retrieval.image_to_text.R@1|R@5|R@10|median_rank   (concept-aware: same concept counts as a hit)
  retrieval.text_to_image.R@1|R@5|R@10|median_rank
  retrieval.strict.image_to_text.*, retrieval.strict.text_to_image.*   (own pair only)
  linear_probe.top1|regularizer|val_top1, knn.top1@k1|top1@k10|top1@k20   (frozen image features, dataset labels)
  embedding.*   (spectrum metrics of the evaluation embeddings)
  classification.<dataset>.zero_shot.top1|top5, .linear_probe.*, .knn.*   (evals.classification)
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from clipjax.logging import to_jsonable
from clipjax.evals.zero_shot import class_embeddings, per_class_accuracy, zero_shot_accuracy
from clipjax.evals.retrieval import retrieval_metrics


def evaluate_embeddings(*, image_emb: np.ndarray, text_emb: np.ndarray, arrays: dict,
                        encode_texts: Callable[[list[str]], np.ndarray], zero_shot_tasks: dict,
                        evals_config) -> dict:
    report: dict = {"num_examples": int(len(image_emb))}
    if evals_config.zero_shot and zero_shot_tasks:
        zs = {}
        for attribute, (class_names, templates) in zero_shot_tasks.items():
            classes = class_embeddings(encode_texts, class_names, templates)
            labels = np.asarray(arrays[attribute])
            zs[attribute] = zero_shot_accuracy(image_emb, classes, labels)
            zs[attribute]["per_class"] = per_class_accuracy(image_emb, classes, labels, class_names)
        zs["mean_top1"] = float(np.mean([v["top1"] for v in zs.values()]))
        report["zero_shot"] = zs
    if evals_config.retrieval:
        report["retrieval"] = retrieval_metrics(image_emb, text_emb, arrays.get("label"))
    return report


def frozen_feature_metrics(*, train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                           test_labels: np.ndarray, evals_config) -> dict:
    """Linear probe and kNN on frozen image features (labels must be non-negative class ids)."""
    from clipjax.evals.knn import knn_accuracy
    from clipjax.evals.linear_probe import linear_probe

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    out = {}
    if evals_config.linear_probe:
        out["linear_probe"] = linear_probe(train_features, train_labels, test_features, test_labels,
                                           num_classes=num_classes)
    if evals_config.knn:
        out["knn"] = knn_accuracy(train_features, train_labels, test_features, test_labels,
                                  num_classes=num_classes)
    return out


def write_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_jsonable(report), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def summary_lines(report: dict) -> list[str]:
    lines = [f"evaluation at step {report.get('step')} on {report.get('num_examples')} held-out examples"]
    for attribute, result in report.get("zero_shot", {}).items():
        if isinstance(result, dict):
            extra = f"  top-5 {result['top5']:.2%}" if "top5" in result else ""
            lines.append(f"  zero-shot {attribute:<10} top-1 {result['top1']:.2%}{extra}")
    for name in ("linear_probe", "knn"):
        if name in report:
            lines.append(f"  {name:<24} " + "  ".join(f"{k} {v:.2%}" for k, v in report[name].items() if "top1" in k))
    for dataset, result in report.get("classification", {}).items():
        parts = [f"zero-shot top-1 {result['zero_shot']['top1']:.2%}"]
        parts += [f"{n} {v:.2%}" for n, v in (("probe", result.get("linear_probe", {}).get("top1")),
                                              ("kNN@20", result.get("knn", {}).get("top1@k20"))) if v is not None]
        lines.append(f"  {dataset:<24} " + "  ".join(parts))
    retrieval = report.get("retrieval")
    if retrieval:
        for direction in ("image_to_text", "text_to_image"):
            r, s = retrieval[direction], retrieval["strict"][direction]
            lines.append(f"  {direction:<14} R@1 {r['R@1']:.3f}  R@5 {r['R@5']:.3f}  R@10 {r['R@10']:.3f}"
                         f"   (strict R@1 {s['R@1']:.3f})")
    return lines
