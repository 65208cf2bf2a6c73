"""Dense features: a linear probe per patch token of the frozen image tower.

Why: the contrastive and sigmoid losses train the pooled embedding; what the patch tokens hold
about their own part of the image is what segmentation and detection read, and what SigLIP 2's
self-distillation and masked prediction are meant to improve (clipjax/losses/image_losses.py).
Where the data source knows which pixels belong to the object (`object_masks`: the shapes
dataset renders them again from its seed), each patch of the first `examples` held-out images
is labelled object or background (at least half its pixels on the object), and with the
object's colour (8 colours, background a 9th class). Two closed-form ridge probes
(clipjax/evals/linear_probe.py) are fitted on the patches of the first half of those images and
tested on the second half: `miou` is the mean over {background, object} of the probe's
intersection over union, `color_accuracy` the share of the object patches whose colour the
9-class probe gets right.
"""

from __future__ import annotations

import numpy as np

from clipjax.evals.base import Evaluator, SkipEvaluation, register_evaluator
from clipjax.evals.embed import gather_rows
from clipjax.evals.linear_probe import linear_probe
from clipjax.schema import Field


def patch_labels(masks: np.ndarray, patch: int) -> np.ndarray:
    """bool [n, patches]: the patches (row by row) with at least half their pixels on the object."""
    n, s, _ = masks.shape
    g = s // patch
    share = masks[:, : g * patch, : g * patch].reshape(n, g, patch, g, patch).mean(axis=(2, 4))
    return (share >= 0.5).reshape(n, g * g)


def binary_miou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the two classes (False, True) of intersection over union."""
    ious = []
    for c in (False, True):
        p, t = predicted == c, truth == c
        union = np.sum(p | t)
        ious.append(np.sum(p & t) / union if union else 1.0)
    return float(np.mean(ious))


@register_evaluator
class DenseProbeEvaluator(Evaluator):
    """Per-patch linear probes of object vs background and of colour (sources with object masks)."""

    kind = "dense_probe"
    FIELDS = {
        "examples": Field(1000, "held-out images probed: the first half fits, the second tests", minimum=4),
    }

    def run(self, encoders):
        data = self.data
        masks_of = getattr(data.source, "object_masks", None)
        if masks_of is None:
            raise SkipEvaluation(f"data.name={data.source.config.name!r} gives no object masks")
        patch = self.config.model.image.get("patch_size")
        if self.config.model.image.kind != "vit" or not patch:
            raise SkipEvaluation("the dense probe reads a ViT's patch tokens")
        n = min(int(self.settings["examples"]), data.num_heldout)
        share, local = data.heldout_share(), data.heldout_local
        mine = max(0, min(len(local["image"]), n - share.rows.start))
        features = gather_rows(encoders.local_patch_tokens(local["image"][:mine], min(share.length, n)))
        fields = data.heldout_fields
        objects = patch_labels(masks_of("test", fields["index"][:n]), int(patch))
        colors = np.where(objects, fields["color"][:n, None], 8)
        half = n // 2
        flat = lambda x: x.reshape(-1, *x.shape[2:])
        train, test = flat(features[:half]), flat(features[half:])
        is_object = linear_probe(
            train,
            flat(objects[:half]).astype(int),
            test,
            flat(objects[half:]).astype(int),
            num_classes=2,
            return_predictions=True,
        )
        color = linear_probe(
            train, flat(colors[:half]), test, flat(colors[half:]), num_classes=9, return_predictions=True
        )
        truth_objects = flat(objects[half:])
        color_right = color["predictions"][truth_objects] == flat(colors[half:])[truth_objects]
        return {
            "dense_probe": {
                "images": n,
                "patches": int(features.shape[1]),
                "object_share": float(np.mean(objects)),
                "miou": binary_miou(is_object["predictions"].astype(bool), truth_objects),
                "color_accuracy": float(np.mean(color_right)) if color_right.size else 0.0,
            }
        }
