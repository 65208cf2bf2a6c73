"""Captioning of the held-out images by a model with a decoder (CoCa, LocCa).

Two measures. The teacher-forced cross-entropy of the held-out captions (and its perplexity),
which every decoder has and which needs no generation. And, where the data source can read a
caption back into the attributes it labels its images with (`parse_caption`: the shapes
dataset's shape, colour, size and position), the captions the model writes itself, greedily or
by beam search: for each attribute the fraction of generated captions that state it and the
fraction of those that state it correctly. The accuracy counts only what a caption states,
because the training captions leave attributes out at random (shapes drops each with a fixed
probability), so a model that learns the data also leaves some out.

A decoder trained on LocCa's tasks is also asked, for each of those held-out images that has an
object box, where the object its caption describes is (referring expression): `referring` gives
the mean IoU of the boxes it writes with the true ones and the share with IoU >= 0.5 (the usual
"accuracy" of referring expression comprehension).
"""

from __future__ import annotations

import math

import numpy as np

from clipjax.evals.base import Evaluator, SkipEvaluation, register_evaluator
from clipjax.evals.embed import gather_objects, sum_over_processes
from clipjax.schema import Field


@register_evaluator
class CaptioningEvaluator(Evaluator):
    """Captioning: held-out cross-entropy and perplexity; attributes of generated captions."""

    kind = "captioning"
    FIELDS = {
        "generate_examples": Field(
            500, "held-out images captioned by generation (the slow part; 0: none)", minimum=0
        ),
        "beams": Field(1, "1: greedy captions; more: the best of this many by beam search", minimum=1),
        "samples": Field(5, "generated captions shown in the report beside their image's own", minimum=0),
    }

    def run(self, encoders):
        if not encoders.has_decoder:
            raise SkipEvaluation("the model has no captioning decoder (model.decoder.variant is 'none')")
        data = self.data
        local, share = data.heldout_local, data.heldout_share()
        if not data.num_heldout:
            raise SkipEvaluation("there are no held-out examples")
        chunk = int(self.config.loss.get("caption_vocab_chunk", 0))
        sums = encoders.local_caption_loss(local["image"], local["text"], share.length, chunk)
        total, count = sum_over_processes(np.asarray(sums, np.float64).sum(axis=0))
        cross_entropy = float(total / max(count, 1.0))
        out = {"cross_entropy": cross_entropy, "perplexity": float(math.exp(min(cross_entropy, 80.0)))}
        n = min(int(self.settings["generate_examples"]), data.num_heldout)
        if n:
            out.update(self._generated(encoders, n))
        if n and "box" in local and self.config.model.decoder.get("tasks") == "locca":
            out["referring"] = self._referring(encoders, n)
        return {"captioning": out}

    def _referring(self, encoders, n: int) -> dict:
        """IoU of the boxes written for the captions of the first n held-out images that have one."""
        data = self.data
        share, local = data.heldout_share(), data.heldout_local
        mine = max(0, min(len(local["image"]), n - share.rows.start))
        truth = local["box"][:mine]
        found = encoders.local_referring_boxes(
            local["image"][:mine], local["text"][:mine], min(share.length, n)
        )
        has = (truth[:, 2] > truth[:, 0]) & (truth[:, 3] > truth[:, 1])
        iou = box_iou(found[has], truth[has])
        total, hits, count = sum_over_processes(
            np.array([iou.sum(), (iou >= 0.5).sum(), len(iou)], np.float64)
        )
        return {
            "boxes": int(count),
            "mean_iou": float(total / max(count, 1)),
            "iou_50": float(hits / max(count, 1)),
        }

    def _generated(self, encoders, n: int) -> dict:
        """Captions of the first n held-out images (each process its share of them)."""
        data = self.data
        share = data.heldout_share()
        mine = max(0, min(len(data.heldout_local["image"]), n - share.rows.start))
        tokens = encoders.local_caption_tokens(
            data.heldout_local["image"][:mine], min(share.length, n), beams=self.settings["beams"]
        )
        captions = [data.tokenizer.decode(row) for row in tokens]
        out: dict = {"generated": n, "mean_words": float(_mean_words(captions, n))}
        parse = getattr(data.source, "parse_caption", None)
        if parse is not None:
            fields = {
                k: v[share.rows.start : share.rows.start + mine] for k, v in data.heldout_fields.items()
            }
            out["attributes"] = _attribute_scores(parse, captions, fields)
        samples = int(self.settings["samples"])
        if samples:
            shown = [c for part in gather_objects(captions[:samples]) for c in part][:samples]
            truth = data.heldout_fields["caption"][:samples]
            out["samples"] = [{"generated": str(g), "reference": str(r)} for g, r in zip(shown, truth)]
        return out


def _mean_words(captions: list[str], n: int) -> float:
    words = sum_over_processes(np.array([sum(len(c.split()) for c in captions)], np.int64))[0]
    return words / max(n, 1)


def _attribute_scores(parse, captions: list[str], fields: dict) -> dict:
    """Per attribute the parse knows and the held-out records label: stated (the fraction of
    captions that say it) and accuracy (correct among those), summed over processes; `all`:
    correct / stated over every attribute."""
    parsed = [parse(c) for c in captions]
    names = [k for k in (parsed[0] if parsed else parse("")) if k in fields]
    counts = np.zeros((len(names), 2), np.int64)  # stated, correct
    for i, attributes in enumerate(parsed):
        for j, name in enumerate(names):
            if attributes[name] >= 0:
                counts[j, 0] += 1
                counts[j, 1] += int(attributes[name] == int(fields[name][i]))
    counts = sum_over_processes(counts)
    n = sum_over_processes(np.array([len(captions)], np.int64))[0]
    out = {
        name: {"stated": float(s / max(n, 1)), "accuracy": float(c / s) if s else 0.0}
        for name, (s, c) in zip(names, counts)
    }
    stated, correct = counts.sum(axis=0) if len(counts) else (0, 0)
    out["all"] = {
        "stated": float(stated / max(n * max(len(names), 1), 1)),
        "accuracy": float(correct / max(stated, 1)),
    }
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes [n, 4] (x_min, y_min, x_max, y_max), row by row."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0.0, None) * np.clip(x[:, 3] - x[:, 1], 0.0, None)
    inter = width * height
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
