"""LocCa on the embedded `shapes` data: the demo's dual encoder plus a decoder trained on
captioning, referring expressions and grounded captioning.

    python -m clipjax.train --config configs/locca_demo.py --workdir runs/locca_demo

The shapes records carry each object's box (`data.shapes_boxes`). Beside the demo's InfoNCE, a
decoder with its own token embedding reads all 16 image tokens and is trained, each example
drawn one task, to caption the image, to write the box of the object a caption describes
(referring expression: text -> box), and to caption the object in a given box (grounded
captioning: box -> text), boxes written as coordinate tokens (Wan et al., "LocCa: Visual
Pretraining with Location-aware Captioners", 2024; clipjax/models/locca.py). Evaluation adds the
captioning evaluator: held-out perplexity, the attributes the greedy captions state, and the
IoU of the boxes the decoder writes for the held-out captions (docs/captioning.md).

    model = clipjax.load("runs/locca_demo"); model.caption(images); model.locate(images, texts)

`:contrastive` is the same model and steps without the decoder (the comparison in
docs/captioning.md); `:tiny` a few steps (the tests run every config).

Pod: v5e:2x2 (4 chips, the smallest slice; the demo itself runs on a CPU); checked by `python -m
clipjax.plan` (docs/scaling.md).
"""

import pathlib

from clipjax.cli import load_config_file


def get_config(arg: str = ""):
    if arg not in ("", "tiny", "contrastive"):
        raise ValueError(f"configs/locca_demo.py: unknown arg {arg!r} (expected '', 'tiny' or 'contrastive')")
    c = load_config_file(
        f"{pathlib.Path(__file__).resolve().parent / 'demo.py'}:{'tiny' if arg == 'tiny' else ''}"
    )
    # Whole captions: the demo's 12 tokens cut 38% of them short (configs/coca_demo.py).
    c.data.tokenizer.max_len = 16
    if arg == "contrastive":
        return c
    c.data.shapes_boxes = True
    c.model.decoder.variant = "tiny"
    c.model.decoder.input = "embed"
    c.model.decoder.cross_attention = "tokens"
    c.model.decoder.tasks = "locca"
    # 32-pixel images: 33 coordinate tokens make every pixel edge exact.
    c.model.decoder.box_bins = 33
    c.loss.caption_weight = 2.0
    c.loss.contrastive_weight = 1.0
    c.evals.captioning.enabled = True
    c.evals.captioning.generate_examples = 64 if arg == "tiny" else 1000
    return c
