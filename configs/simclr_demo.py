"""SimCLR (image-image) on the embedded `shapes` data with nuisance factors, sized for a 2-core CPU.

    python -m clipjax.train --config configs/simclr_demo.py --workdir runs/simclr_demo

Two augmented views of each image, NT-Xent over the global batch of 2B views (`loss.name`
picks a false-negative-aware objective instead), LARS with lr = base x batch / 256, warm-up and
cosine. Evaluation probes the tower's features (before the projector) for the semantic labels
(shape, color, size, position) and the nuisance ones (light, gradient, texture, noise,
vignette): docs/false_negatives.md. `:tiny` shrinks it to a few steps (the tests use it).
"""

from clipjax.config import default_config
from clipjax.data import shapes

SEMANTIC = shapes.ATTRIBUTE_NAMES  # shape, color, size, position
NUISANCE = shapes.NUISANCE_NAMES  # light, gradient, texture, noise, vignette
# LARS (trust coefficient 1e-3) per 256 examples of global batch; of 0.6 and 2.4 the better at 256.
BASE_LR = 2.4


def get_config(arg: str = ""):
    c = default_config()
    c.task = "image_image"
    c.steps = 400
    c.log_every = 50
    c.checkpoint_every = 200
    c.data.name = "shapes"
    c.data.shapes_nuisance = True
    c.data.batch_size = 256
    c.data.num_train = 50_000
    c.data.num_test = 5_000
    c.data.tokenizer.kind = "byte"
    c.data.tokenizer.max_len = 8  # captions are read but unused in image-image mode
    # The augmentations change what the nuisance factors do not carry: the crop (scale and
    # aspect) and a flip, which keep the light level, gradient axis, texture, noise and
    # vignette. Colour jitter, grayscale and blur would erase colour (a semantic label here) or
    # noise and texture; leaving nuisance intact is the setting where false negatives harm.
    c.augment.crop_scale = (0.4, 1.0)
    c.augment.color_jitter = 0.0
    c.augment.grayscale = 0.0
    c.augment.blur = 0.0
    # A narrower version of the demo's CNN (a quarter of its FLOPs: two views of every image go
    # through it), its 4x4 map flattened into a 1,024-wide representation.
    c.model.image.kind = "resnet"
    c.model.image.stem_width = 16
    c.model.image.widths = (32, 64, 64)
    c.model.image.blocks_per_stage = 0
    c.model.image.pool = "flatten"
    c.model.projector.layers = 2
    c.model.projector.hidden = 256
    c.model.embed_dim = 64
    # SimCLR's fixed temperature (0.2 suits a few hundred views).
    c.model.logit_scale_init = 1.6094379124341003  # ln(1 / 0.2)
    c.optim.frozen = ("logit_scale",)
    c.loss.impl = "gather"
    c.optim.name = "lars"
    c.optim.lr = BASE_LR * c.data.batch_size / 256
    c.optim.b1 = 0.9
    c.optim.weight_decay = 1e-6
    c.optim.clip_norm = 0.0
    c.optim.warmup_fraction = 0.1
    c.metrics.every = 50
    c.evals.zero_shot.enabled = False
    c.evals.retrieval.enabled = False
    c.evals.embedding.enabled = False
    c.evals.max_examples = 2000
    c.evals.linear_probe.train_examples = 5000
    c.evals.linear_probe.fields = SEMANTIC + NUISANCE
    c.evals.knn.train_examples = 5000
    c.evals.knn.fields = SEMANTIC + NUISANCE
    if arg == "tiny":
        c.data.worker_count = 0
        c.steps = 4
        c.log_every = 2
        c.checkpoint_every = 2
        c.data.batch_size = 32
        c.optim.lr = BASE_LR * c.data.batch_size / 256
        c.data.num_train = 512
        c.data.num_test = 128
        c.evals.max_examples = 128
        c.evals.batch_size = 64
        c.evals.linear_probe.train_examples = 256
        c.evals.knn.train_examples = 256
    elif arg:
        raise ValueError(f"configs/simclr_demo.py: unknown arg {arg!r} (expected '' or 'tiny')")
    return c
