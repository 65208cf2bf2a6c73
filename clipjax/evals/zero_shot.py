"""Zero-shot classification: class names x prompt templates, averaged into one classifier per class."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from clipjax.evals.base import Evaluator, SkipEvaluation, register_evaluator
from clipjax.evals.embed import l2_normalize, sum_over_processes


def class_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """[C, d]: the mean of each class's normalised prompt embeddings, renormalised (CLIP's recipe)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = l2_normalize(encode_texts(prompts)).reshape(len(class_names), len(templates), -1)
    return l2_normalize(emb.mean(axis=1))


def unreadable_class_names(tokenizer, class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The class names that a tokenizer with an unknown token (sentencepiece) does not read in
    some prompt: the name alone holds the unknown token (a word the captions that trained the
    tokenizer never contain), or a prompt does not hold the name's tokens in a row (the name
    merged with the template's text into one unknown word, such as "seven." once was, or cut
    off at `max_len`). Such prompts differ from class to class by nothing the model learnt, so
    zero-shot cannot tell those classes apart: below chance, not near it."""
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None or not class_names:
        return []
    special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}

    def words(row) -> list[int]:
        return [i for i in row if i not in special]

    unreadable = []
    for name, alone in zip(class_names, tokenizer.encode(list(class_names)).tolist()):
        own = words(alone)
        prompts = tokenizer.encode([t.format(name) for t in templates]).tolist()
        if not own or unk in own or not all(_holds(words(p), own) for p in prompts):
            unreadable.append(name)
    return unreadable


def warn_unreadable_class_names(tokenizer, class_names, templates, where: str, log) -> list[str]:
    """`unreadable_class_names`, and one warning line through `log` when there are any."""
    unknown = unreadable_class_names(tokenizer, class_names, templates)
    if unknown:
        log(
            f"{where}: warning: {len(unknown)} of {len(class_names)} class names are unknown to the "
            f"tokenizer in some prompt (words the training captions never contain, or cut off): "
            f"{', '.join(map(repr, unknown[:5]))}{', ...' if len(unknown) > 5 else ''}; zero-shot "
            "cannot tell them apart there (name the classes as the captions do)"
        )
    return unknown


def _holds(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def zero_shot_counts(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """What a zero-shot report is made of, as counts that add up over any split of the images:
    [top-1 hits, top-5 hits, then per class: top-1 hits (by argmax), images]."""
    scores = image_emb @ class_emb.T
    order = np.argsort(-scores, axis=1)
    num_classes = class_emb.shape[0]
    hits = [np.sum(order[:, 0] == labels), np.sum(np.any(order[:, :5] == labels[:, None], axis=1))]
    correct = labels[np.argmax(scores, axis=1) == labels]
    return np.concatenate(
        [hits, np.bincount(correct, minlength=num_classes), np.bincount(labels, minlength=num_classes)]
    ).astype(np.int64)


def zero_shot_report(counts: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """top-1, top-5 (when there are more than 5 classes) and, given the class names, per-class
    top-1 accuracy from `zero_shot_counts`."""
    num_classes = (len(counts) - 2) // 2
    correct, images = counts[2 : 2 + num_classes], counts[2 + num_classes :]
    result = {"top1": float(counts[0] / images.sum())}
    if num_classes > 5:
        result["top5"] = float(counts[1] / images.sum())
    if class_names is not None:
        result["per_class"] = {
            name: float(correct[c] / images[c]) for c, name in enumerate(class_names) if images[c]
        }
    return result


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> dict:
    """top-1 and top-5 (when there are more than 5 classes) accuracy."""
    return zero_shot_report(zero_shot_counts(image_emb, class_emb, labels))


@register_evaluator
class ZeroShotEvaluator(Evaluator):
    """Zero-shot classification of each attribute the data source labels (class names x prompts)."""

    kind = "zero_shot"

    def run(self, encoders):
        tasks = self.data.source.zero_shot_tasks()
        if not tasks:
            raise SkipEvaluation(
                f"data.name={self.data.source.config.name!r} names no classes to classify "
                "(own data: a CSV `label` column of class names, class subfolders, or data.class_names "
                "for numeric labels: a CSV's, webdataset's .cls or data.label_field, tfds' data.tfds_label_key)"
            )
        arrays = self.data.heldout_fields
        # Each process scores its share of the images; only the counts are summed.
        share = self.data.heldout_share()
        image_emb = self.data.local_heldout_image_embeddings(encoders)
        result = {}
        for attribute, (class_names, templates) in tasks.items():
            labels = np.asarray(arrays[attribute])
            if not (labels >= 0).any():  # own data may label only some images
                raise SkipEvaluation(f"no held-out example has a {attribute!r} label")
            if labels.max() >= len(class_names):
                raise SkipEvaluation(
                    f"held-out label {int(labels.max())} has no class name ({len(class_names)} names given)"
                )
            unknown = warn_unreadable_class_names(
                getattr(encoders, "tokenizer", None),
                class_names,
                templates,
                f"evals.{self.name} ({attribute})",
                self.log,
            )
            classes = class_embeddings(encoders.text, class_names, templates)
            local = labels[share.rows]
            labelled = local >= 0
            counts = zero_shot_counts(image_emb[labelled], classes, local[labelled])
            result[attribute] = zero_shot_report(sum_over_processes(counts), class_names)
            if unknown:
                result[attribute]["class_names_unknown_to_tokenizer"] = unknown
        result["mean_top1"] = float(np.mean([v["top1"] for v in result.values()]))
        return {"num_examples": self.data.num_heldout, "zero_shot": result}
