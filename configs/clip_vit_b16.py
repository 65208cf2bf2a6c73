"""CLIP ViT-B/16 with softmax (InfoNCE) loss and global negatives, for a large mesh.

    python -m clipjax.train --config configs/clip_vit_b16.py --workdir gs://BUCKET/clip_b16
    launch/tpu_pod.sh --config configs/clip_vit_b16.py --workdir gs://BUCKET/clip_b16

The towers compute in bfloat16 (parameters, embeddings and the loss stay float32), keep only
the dense layers' matmul outputs for the backward pass (`model.remat`) and run attention through
`jax.nn.dot_product_attention`.

Point `data.name`/`data.source` at an image-text dataset. `configs/clip_vit_b16.py:tiny` keeps
the structure (ViT, FSDP mesh, precision, remat, attention) at a size that runs one step on CPU.

Pod: v5p:4x4x4 (64 chips; Cloud TPU accelerator type v5p-128, which counts TensorCores), 512
examples per chip; checked by `python -m clipjax.plan` (docs/scaling.md).
"""

import math

from clipjax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.steps = 0
    c.epochs = 32.0
    c.log_every = 100
    c.checkpoint_every = 2000
    c.mesh.axes = ("data", "fsdp", "model")
    c.mesh.shape = (1, -1, 1)  # fully sharded data parallel over all devices
    c.data.name = "image_text_folder"
    c.data.source = "/path/to/captions.csv"
    c.data.data_dir = "/path/to/tfds"
    c.data.num_train = 0  # the converted CSV's count (`epochs` counts it)
    c.data.batch_size = 32_768
    c.data.image_size = 224
    # CLIP-style augmentation: a random region of 90-100% of the image (evaluation centre-crops).
    c.data.random_resized_crop = (0.9, 1.0)
    # Decoding in one grain worker process per CPU core of the host (the default, spelled out).
    c.data.worker_count = -1
    c.data.tokenizer.kind = "byte"
    c.data.tokenizer.max_len = 77
    c.model.image.kind = "vit"
    c.model.image.variant = "B/16"
    c.model.image.pool = "cls"
    c.model.text.variant = "B"
    c.model.text.causal = True
    c.model.text.pool = "last"
    c.model.embed_dim = 512
    c.model.dtype = "bfloat16"
    # Keeps each block's dense-layer outputs and recomputes the rest, attention included: about
    # 44 MB of saved activations per example (both towers, bf16), against 7 MB for "full" (use it
    # if memory runs short) and 230 MB for "none".
    c.model.remat = "dots_with_no_batch_dims_saveable"
    c.model.attention = "dot_product_attention"
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.loss.name = "softmax"
    c.optim.lr = 5e-4
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.2
    c.optim.warmup_fraction = 0.0
    c.optim.warmup_steps = 10_000
    if arg == "tiny":
        _shrink(c)
    elif arg:
        raise ValueError(f"configs/clip_vit_b16.py: unknown arg {arg!r} (expected '' or 'tiny')")
    return c


def _shrink(c):
    """Same structure, CPU size: shapes data, a tiny ViT and text tower, two FSDP shards."""
    c.steps, c.epochs = 2, 0.0
    c.log_every = c.checkpoint_every = 1
    c.mesh.shape = (-1, 2, 1)
    c.data.name = "shapes"
    c.data.source = ""
    c.data.data_dir = "data/tfds"
    c.data.num_train, c.data.num_test = 512, 128
    c.data.batch_size = 32
    c.data.image_size = 32
    # 32 px shapes crop in microseconds: starting worker processes would cost more than they save.
    c.data.worker_count = 0
    c.data.tokenizer.max_len = 32
    c.model.image.variant = "tiny"
    c.model.text.variant = "tiny"
    c.model.embed_dim = 32
    c.optim.warmup_steps = 1
    c.evals.max_examples = 64
    c.evals.batch_size = 32
