"""SimCLR on ImageNet-1k: ViT-S/16, batch 4,096, LARS, 100 epochs, on a TPU pod or GPU nodes.

    launch/tpu_pod.sh --config configs/simclr_imagenet.py --workdir gs://BUCKET/runs/simclr_rn50 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`imagenet2012` must be prepared in `data.data_dir` as ArrayRecord (tfds build imagenet2012
--file_format array_record, with the archives downloaded by hand; nothing is fetched at run
time). The recipe is SimCLR's (Chen et al. 2020): two views with random resized crops, flips,
colour jitter of strength 1 (0.8, 0.8, 0.8, 0.2) with probability 0.8, grayscale 0.2, blur 0.5,
a 3-layer MLP projector to 128-d on ViT-S/16's 384-d class token, NT-Xent at temperature 0.1,
LARS with lr = 0.3 x batch / 256, weight decay 1e-6, 10 warm-up epochs and a cosine decay.
`loss.name` swaps in a false-negative-aware objective (docs/false_negatives.md);
`--config.loss.positives=label` with `multi_positive` is the oracle that knows the classes.
Evaluation probes the tower's features on the validation split. `:tiny` keeps its structure at CPU
size on the embedded data (the tests use it).

Pod: v5e:4x4 (16 chips: v5litepod-16), 256 images (512 views) per chip; checked by `python -m
clipjax.plan` (docs/scaling.md).
"""

import math

from clipjax.config import default_config

BASE_LR = 0.3  # LARS, per 256 examples of global batch


def get_config(arg: str = ""):
    c = default_config()
    c.task = "image_image"
    c.epochs = 100.0
    c.steps = 0
    c.log_every = 100
    c.checkpoint_every = 2_000
    c.data.name = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.tfds_image_key = "image"
    c.data.tfds_caption_key = ""  # no captions: the class name stands in (unused by the loss)
    c.data.tfds_label_key = "label"
    c.data.tfds_eval_split = "validation"
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.num_train = 1_281_167
    c.data.batch_size = 4096
    c.data.image_size = 224
    c.data.tokenizer.kind = "byte"
    c.data.tokenizer.max_len = 16
    c.augment.brightness = 0.8
    c.augment.contrast = 0.8
    c.augment.saturation = 0.8
    c.augment.hue = 0.2
    c.model.image.kind = "vit"
    c.model.image.variant = "S/16"
    c.model.remat = "full"
    c.model.projector.layers = 3
    c.model.projector.hidden = 2048
    c.model.embed_dim = 128
    c.model.dtype = "bfloat16"
    c.model.logit_scale_init = math.log(1 / 0.1)
    c.optim.frozen = ("logit_scale",)
    c.optim.name = "lars"
    c.optim.lr = BASE_LR * c.data.batch_size / 256
    c.optim.b1 = 0.9
    c.optim.weight_decay = 1e-6
    c.optim.clip_norm = 0.0
    c.optim.warmup_fraction = 0.1
    c.loss.impl = "ring"
    c.mesh.shape = (-1, 1, 1)
    c.evals.zero_shot.enabled = False
    c.evals.retrieval.enabled = False
    c.evals.embedding.enabled = False
    c.evals.max_examples = 10_000
    c.evals.batch_size = 1000
    c.evals.linear_probe.train_examples = 50_000
    c.evals.knn.train_examples = 50_000
    if arg == "tiny":
        _shrink(c)
    elif arg:
        raise ValueError(f"configs/simclr_imagenet.py: unknown arg {arg!r} (expected '' or 'tiny')")
    return c


def _shrink(c):
    """Same structure, CPU size: the embedded shapes data at 32 px, a tiny ViT, a few steps."""
    c.epochs, c.steps = 0.0, 4
    c.log_every = c.checkpoint_every = 2
    c.data.name = "shapes"
    c.data.data_dir = "data/tfds"
    c.data.num_train, c.data.num_test = 512, 128
    c.data.batch_size = 32
    c.data.image_size = 32
    c.data.worker_count = 0
    c.optim.lr = BASE_LR * c.data.batch_size / 256
    c.model.image.variant = "tiny"
    c.model.remat = "none"
    c.model.dtype = "float32"
    c.model.projector.hidden = 64
    c.model.embed_dim = 32
    c.loss.impl = "gather"
    c.evals.max_examples = 128
    c.evals.batch_size = 64
    c.evals.linear_probe.train_examples = 256
    c.evals.knn.train_examples = 256
