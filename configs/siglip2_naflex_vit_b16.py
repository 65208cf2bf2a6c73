"""SigLIP 2 ViT-B/16 NaFlex: the sigmoid loss on images kept at about their aspect ratio, each
batch at 256, 576 or 1,024 patches.

    python -m clipjax.train --config configs/siglip2_naflex_vit_b16.py --workdir gs://BUCKET/siglip2_naflex_b16 \\
        --config.init_from=gs://BUCKET/siglip2_b16 --config.init_from_towers="('image_tower', \\
        'image_proj', 'text_tower', 'text_proj', 'logit_scale', 'logit_bias')"

The NaFlex stage of configs/siglip2_vit_b16.py: its towers and text side (the Gemma tokenizer
at 64 tokens) with `model.image.naflex`. Each image, whole (no random crop, which would draw
aspect ratios of its own), is resized so that both sides are multiples of 16 and its patches
number at most the batch's sequence length, drawn uniformly per step from
`data.naflex_seq_lens`; the position table (16 x 16: `data.image_size` 256) is resized to each
image's grid and the padding masked (docs/siglip2.md). The three lengths are clipjax's choice of
a few, as SigLIP 2 trains with several. clipjax does not yet train NaFlex with the LocCa decoder
or the image-side losses (refused), so this stage has neither: it continues a fixed-resolution
run's weights (`init_from` with the parts named above, the decoder and the heads left behind)
for a tenth of its epochs. Evaluation embeds 256 px squares (16 x 16 patches, no padding).

`:tiny` keeps the structure at a size that runs a few steps on CPU (shapes data, two lengths).

Pod: v5p:4x8x8 (256 chips), 128 examples per chip; compiled at the longest length (1,024
patches) by `python -m clipjax.plan` (docs/scaling.md).
"""

import importlib.util
import os


def _siglip2_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "siglip2_vit_b16.py")
    spec = importlib.util.spec_from_file_location("siglip2_vit_b16", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/siglip2_naflex_vit_b16.py: unknown arg {arg!r} (expected '' or 'tiny')")
    c = _siglip2_config(arg)
    # What NaFlex does not go with yet: the decoder and the image-side losses, and their inputs.
    c.model.decoder.variant = "none"
    c.model.image_heads.prototypes = 0
    c.image_losses.self_distillation = 0.0
    c.image_losses.masked_prediction = 0.0
    c.data.random_resized_crop = ()
    c.model.image.naflex = True
    c.model.image.max_num_patches = 256  # what clipjax.load's encode_image fits an image to
    if arg == "tiny":
        c.data.shapes_boxes = False
        c.steps = 4
        c.data.naflex_seq_lens = (16, 64)  # 4 x 4 and 8 x 8 patches of 4 px
        return c
    c.data.box_field = ""
    c.data.naflex_seq_lens = (256, 576, 1024)
    # clipjax's choice for a continuation: a tenth of the fixed-resolution run's 32 epochs, warmed
    # up over its first 5%.
    c.epochs = 3.2
    c.optim.warmup_fraction = 0.05
    return c
