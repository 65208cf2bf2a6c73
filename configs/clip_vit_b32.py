"""CLIP ViT-B/32 in the published layout (OpenAI's: ln_pre, no patch bias, causal text tower pooled
at the end-of-text token, QuickGELU), trained from scratch on webdataset shards.

    python -m clipjax.train --config configs/clip_vit_b32.py --workdir gs://BUCKET/clip_b32 \
        --config.data.shards='gs://BUCKET/laion/{00000..41407}.tar' \
        --config.data.tokenizer.vocab_file=gs://BUCKET/bpe_simple_vocab_16e6.txt.gz
    launch/tpu_pod.sh --config configs/clip_vit_b32.py --workdir gs://BUCKET/clip_b32 ...

A model trained with it exports to Hugging Face (`python -m clipjax.convert export --format
hf_clip`) or open_clip (`--to open_clip`), and a converted OpenAI / open_clip B/32 has the same parameters (docs/pretrained.md).
The rest (batch 32k, bf16, remat, optimizer) follows configs/clip_vit_b16.py. `:tiny` runs two
steps on CPU with the same layout at a tiny size.

Pod: v5p:4x4x4 (64 chips; Cloud TPU accelerator type v5p-128, which counts TensorCores), 512
examples per chip; checked by `python -m clipjax.plan` (docs/scaling.md).
"""

import importlib.util
import os


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clip_layout(c, image_variant: str, text_variant: str, embed_dim: int):
    """The published CLIP architecture on a config of configs/clip_vit_b16.py's shape."""
    c.model.image.variant = image_variant
    c.model.text.variant = text_variant
    c.model.embed_dim = embed_dim
    c.model.image.pool = "cls"
    c.model.image.ln_pre = True
    c.model.image.patch_bias = False
    c.model.text.causal = True
    c.model.text.pool = "argmax"  # CLIP's end-of-text token has the vocabulary's highest id
    c.model.text.pad_mask = False
    for tower in (c.model.image, c.model.text):
        tower.activation = "quick_gelu"
        tower.norm_eps = 1e-5
    return c


def get_config(arg: str = ""):
    c = _load("clip_vit_b16.py").get_config(arg)
    if arg == "tiny":
        return clip_layout(c, "tiny", "tiny", 32)
    c = clip_layout(c, "B/32", "B", 512)
    c.data.name = "webdataset"
    c.data.shards = "gs://BUCKET/laion/{00000..41407}.tar"
    c.data.tokenizer.kind = "clip_bpe"
    c.data.tokenizer.vocab_file = "gs://BUCKET/bpe_simple_vocab_16e6.txt.gz"
    c.data.tokenizer.max_len = 77
    return c
