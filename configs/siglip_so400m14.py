"""SigLIP So400m/14 (the shape-optimised ViT) with the sigmoid loss, from scratch on webdataset shards.

    python -m clipjax.train --config configs/siglip_so400m14.py --workdir gs://BUCKET/siglip_so400m \
        --config.data.shards='gs://BUCKET/webli/{00000..99999}.tar' \
        --config.data.tokenizer.model_file=gs://BUCKET/siglip_spiece.model
    launch/tpu_pod.sh --config configs/siglip_so400m14.py --workdir gs://BUCKET/siglip_so400m ...

The published SigLIP layout: MAP-head pooling, patch bias, no image projection (the text head
projects to the image width, with a bias), a non-causal text tower read at its last position,
tanh-GELU, SigLIP's sentencepiece tokenizer (64 tokens) and [-1, 1] pixels. It exports to
Hugging Face's SiglipModel (`python -m clipjax.convert export --format hf_siglip`). `:tiny` runs
two steps on CPU with the same layout at a tiny size.

Pod: v5p:4x8x8 (256 chips; Cloud TPU v5p-512), 128 examples per chip; checked by `python -m
clipjax.plan` (docs/scaling.md). On v5p:4x4x8 (256 per chip) the metrics step needs 94.65 of the 95
GiB per chip: too close to book.
"""

import importlib.util
import os


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def siglip_layout(c, image_variant: str, text_variant: str):
    c.model.image.variant = image_variant
    c.model.text.variant = text_variant
    c.model.image.pool = "map"
    c.model.image.patch_bias = True
    c.model.image.ln_pre = False
    c.model.text.causal = False
    c.model.text.pool = "final"
    c.model.text.pad_mask = False
    c.model.image_projection = "none"
    c.model.text_projection_bias = True
    return c


def get_config(arg: str = ""):
    c = _load("siglip_vit_b16.py").get_config(arg)
    if arg == "tiny":
        siglip_layout(c, "tiny", "tiny")
        c.model.embed_dim = 64  # the tiny ViT's width: no image projection
        return c
    siglip_layout(c, "So400m/14", "So400m")
    c.model.embed_dim = 1152
    c.data.image_size = 224
    c.data.name = "webdataset"
    c.data.shards = "gs://BUCKET/webli/{00000..99999}.tar"
    c.data.tokenizer.kind = "sentencepiece"
    c.data.tokenizer.style = "siglip"
    c.data.tokenizer.model_file = "gs://BUCKET/siglip_spiece.model"
    c.data.tokenizer.max_len = 64
    return c
