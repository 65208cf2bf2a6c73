"""CLIP ViT-L/14 in the published layout, trained from scratch on webdataset shards.

    python -m clipjax.train --config configs/clip_vit_l14.py --workdir gs://BUCKET/clip_l14 \
        --config.data.shards='gs://BUCKET/laion/{00000..41407}.tar' \
        --config.data.tokenizer.vocab_file=gs://BUCKET/bpe_simple_vocab_16e6.txt.gz
    launch/tpu_pod.sh --config configs/clip_vit_l14.py --workdir gs://BUCKET/clip_l14 ...

As configs/clip_vit_b32.py with the L/14 image tower, the 768-wide text tower and 768-d
embeddings (OpenAI's ViT-L/14); `:tiny` runs two steps on CPU.

Pod: v5p:4x8x8 (256 chips; Cloud TPU v5p-512), 128 examples per chip; checked by `python -m
clipjax.plan` (docs/scaling.md). On v5p:4x4x8 (256 per chip) the train step needs 93.24 of the 95
GiB per chip: too close to book.
"""

import importlib.util
import os


def _b32():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vit_b32.py")
    spec = importlib.util.spec_from_file_location("clip_vit_b32", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    b32 = _b32()
    c = b32.get_config(arg)
    if arg != "tiny":
        b32.clip_layout(c, "L/14", "L", 768)
    return c
