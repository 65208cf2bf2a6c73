"""SigLIP 2's recipe on the embedded `shapes` data: the sigmoid loss and a LocCa decoder from the
start, then self-distillation and masked prediction against an EMA teacher for the last 20%.

    python -m clipjax.train --config configs/siglip2_demo.py --workdir runs/siglip2_demo

A ViT (patches of 8 pixels: a 4 x 4 grid, MAP pooling) with the sigmoid loss (Zhai et al., 2023)
and LocCa's decoder (captioning, referring expressions, grounded captions; configs/locca_demo.py);
from 80% of the steps on, the student also embeds two local crops of each image and pulls them
towards the EMA teacher's view of the whole image (self-distillation), and predicts the
teacher's patch features under a mask over half its patches (masked prediction), as SigLIP 2
(Tschannen et al., 2025) does: clipjax/losses/image_losses.py. Evaluation adds the dense probe
(object vs background and colour per patch, from the shapes' object masks) and the captioning
evaluator. docs/siglip2.md compares it with `:no_image_losses`, the same run without the two
image-side losses.

`:no_image_losses` the comparison; `:tiny` a few steps (the tests run every config).

Pod: v5e:2x2 (4 chips, the smallest slice; the demo itself runs on a CPU); checked by `python -m
clipjax.plan` (docs/scaling.md).
"""

import math
import pathlib

from clipjax.cli import load_config_file

ARGS = ("", "tiny", "no_image_losses")


def get_config(arg: str = ""):
    if arg not in ARGS:
        raise ValueError(f"configs/siglip2_demo.py: unknown arg {arg!r} (expected one of {ARGS})")
    c = load_config_file(
        f"{pathlib.Path(__file__).resolve().parent / 'locca_demo.py'}:{'tiny' if arg == 'tiny' else ''}"
    )
    c.model.image.kind = "vit"
    c.model.image.variant = "tiny"
    c.model.image.patch_size = 8
    c.model.image.pool = "map"
    c.loss.name = "sigmoid"
    c.model.logit_scale_init = math.log(10.0)
    c.model.logit_bias_init = -10.0
    c.evals.dense_probe.enabled = True
    if arg != "tiny":
        c.evals.captioning.generate_examples = 500
    if arg == "no_image_losses":
        return c
    c.model.image_heads.prototypes = 256
    c.image_losses.self_distillation = 1.0
    c.image_losses.masked_prediction = 1.0
    c.image_losses.start = 0.5 if arg == "tiny" else 0.8
    c.image_losses.local_views = 2
    c.image_losses.local_crop_scale = (0.2, 0.5)
    return c
