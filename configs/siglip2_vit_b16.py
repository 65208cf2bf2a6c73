"""SigLIP 2 ViT-B/16 at 256 px: the sigmoid loss, a LocCa decoder from the start, and
self-distillation and masked prediction against an EMA teacher for the last 20% of training.

    python -m clipjax.train --config configs/siglip2_vit_b16.py --workdir gs://BUCKET/siglip2_b16
    launch/tpu_pod.sh --config configs/siglip2_vit_b16.py --workdir gs://BUCKET/siglip2_b16

configs/siglip_vit_b16.py's towers and optimizer at 256 px (256 patches) with SigLIP 2's text
side: the Gemma tokenizer (256k entries; give its `tokenizer.json` as data.tokenizer.tokenizer_file)
at 64 tokens, lower-cased, eos-terminated (`style = 'siglip2'`). The decoder is LocCa's
(docs/captioning.md): 12 blocks reading all 256 image tokens, trained on captions, referring
expressions and grounded captions; its 256k-entry logits are taken 32,768 entries at a time.
Boxes come from each webdataset sample's `.json` field `box` (samples without one are captioned).
The image-side losses are clipjax/losses/image_losses.py's (docs/siglip2.md). Weights the paper
does not state (the decoder's and the two image losses') are 1.

`:tiny` keeps the structure at a size that runs one step on CPU (shapes data with boxes).

Pod: v5e:16x16 (256 chips, a full v5e pod), 128 examples per chip; checked by `python -m
clipjax.plan` (docs/scaling.md).
"""

import importlib.util
import os


def _siglip_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "siglip_vit_b16.py")
    spec = importlib.util.spec_from_file_location("siglip_vit_b16", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/siglip2_vit_b16.py: unknown arg {arg!r} (expected '' or 'tiny')")
    c = _siglip_config(arg)
    c.model.decoder.input = "embed"
    c.model.decoder.cross_attention = "tokens"
    c.model.decoder.tasks = "locca"
    c.loss.caption_weight = 1.0
    c.loss.contrastive_weight = 1.0
    c.image_losses.self_distillation = 1.0
    c.image_losses.masked_prediction = 1.0
    c.image_losses.start = 0.8
    if arg == "tiny":
        c.data.shapes_boxes = True
        c.model.decoder.variant = "tiny"
        c.model.decoder.box_bins = 33
        c.model.image_heads.prototypes = 16
        c.image_losses.start = 0.5
        c.image_losses.local_views = 1
        return c
    c.data.name = "webdataset"
    c.data.shards = "gs://BUCKET/shards/{00000..09999}.tar"
    c.data.box_field = "box"
    c.data.image_size = 256
    c.data.tokenizer.kind = "hf"
    c.data.tokenizer.tokenizer_file = "/path/to/gemma/tokenizer.json"
    c.data.tokenizer.style = "siglip2"
    c.data.tokenizer.max_len = 64
    c.model.decoder.variant = "B"
    c.model.decoder.box_bins = 1000
    c.loss.caption_vocab_chunk = 32_768
    c.model.image_heads.prototypes = 4096
    c.model.image_heads.hidden = 2048
    c.model.image_heads.bottleneck = 256
    # Each block keeps only its input for the backward pass: the decoder and the image-side
    # passes (local views, the masked image, the teacher) add activations that, saved as
    # configs/clip_vit_b16.py saves them, need 16.9 GiB per v5e chip; 12.4 GiB this way (the
    # TPU compiler's counts, docs/scaling.md).
    c.model.remat = "full"
    c.data.batch_size = 32_768
    return c
