"""SimCLR (image-image) on the embedded `shapes` data with nuisance factors, sized for a 2-core CPU.

    python -m clipjax.train --config configs/simclr_demo.py --workdir runs/simclr_demo

Two augmented views of each image, NT-Xent over the global batch of 2B views (`loss.name`
picks a false-negative-aware objective instead), LARS with lr = base x batch / 256, warm-up and
cosine. Evaluation probes the tower's features (before the projector) for the semantic labels
(shape, color, size, position) and the nuisance ones (light, gradient, texture, noise,
vignette): docs/false_negatives.md.

    python benchmarks/simclr_demo_probe.py   # trains it, then the same probes on the untrained tower

The default's augmentations vary every nuisance factor between the two views (SimCLR's ops and
a random illumination). `:keep_nuisance` is the setting of the false-negative study
(augmentations that keep the nuisance factors, the study's flattened tower); `:tiny` shrinks the
demo to a few steps (tests).
"""

from clipjax.config import default_config
from clipjax.data.sources.shapes import procedural as shapes

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
    # SimCLR's colour jitter (brightness, contrast, saturation, hue; p = 0.8) and blur (p = 0.5)
    # on top of the crop and flip change the background light level, noise and texture between
    # the two views; a random illumination (a light ramp and a radial falloff, p = 0.8) changes
    # the gradient and the vignette, which no SimCLR op does. Then no nuisance factor tells the
    # views apart and the tower has to read the object (shape 51% -> 60% with the illumination).
    # No grayscale: colour is a semantic label here (it cost 10 points of the concept probe).
    # A mean-pooled tower (128 features): its position-free random features are a weak
    # baseline, which a flattened map is not (59% on the 320 concepts untrained).
    c.augment.crop_scale = (0.4, 1.0)
    c.augment.color_jitter = 0.8
    c.augment.grayscale = 0.0
    c.augment.blur = 0.5
    c.augment.illumination = 0.8
    c.augment.ramp = 0.2  # twice the data's gradient (+-25 of 255)
    c.augment.falloff = 0.45  # the data's vignette
    c.model.image.kind = "resnet"
    c.model.image.stem_width = 16
    c.model.image.widths = (32, 64, 128)
    c.model.image.blocks_per_stage = 0
    c.model.image.pool = "mean"
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
    if arg == "keep_nuisance":
        # The setting where false negatives can harm (benchmarks/false_negatives.py): only the
        # crop and the flip, which keep light level, gradient axis, texture, noise and vignette,
        # so two images of one concept stay told apart by what the network can read. The tower
        # is the study's: the same CNN a width narrower at the top, its 4x4 map flattened.
        c.augment.color_jitter = 0.0
        c.augment.blur = 0.0
        c.augment.illumination = 0.0
        c.model.image.widths = (32, 64, 64)
        c.model.image.pool = "flatten"
    elif arg == "tiny":
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
        raise ValueError(
            f"configs/simclr_demo.py: unknown arg {arg!r} (expected '', 'keep_nuisance' or 'tiny')"
        )
    return c
