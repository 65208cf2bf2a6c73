"""Demo: CLIP on the embedded `shapes` dataset, sized for a 2-core CPU (about 4 minutes).

    python -m clipjax.train --config configs/demo.py --workdir runs/demo

`--config configs/demo.py:tiny` shrinks it to a few steps (used by the tests).
"""

from clipjax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.steps = 540
    c.log_every = 50
    c.checkpoint_every = 300
    c.data.name = "shapes"
    c.data.batch_size = 256
    c.data.num_train = 0  # shapes renders 50,000; any other dataset gives its own count
    c.data.num_test = 5_000
    c.data.tokenizer.kind = "sentencepiece"
    c.data.tokenizer.max_len = 12
    # A small CNN tower: it learns shape on 32 px images far faster than a patch ViT, and its
    # flattened 4x4 map keeps the object's position.
    c.model.image.kind = "resnet"
    c.model.image.stem_width = 32
    c.model.image.widths = (64, 128, 128)
    c.model.image.blocks_per_stage = 0
    c.model.image.pool = "flatten"
    c.model.text.variant = "tiny"
    c.model.embed_dim = 64
    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.05
    c.optim.warmup_fraction = 0.05
    c.evals.max_examples = 2000
    if arg == "tiny":
        # A few steps of tiny images (the tests use this): worker processes would take longer to
        # start than the decoding takes, whatever data source the tests switch to.
        c.data.worker_count = 0
        c.steps = 4
        c.log_every = 2
        c.checkpoint_every = 2
        c.data.batch_size = 32
        c.data.num_train = 512
        c.data.num_test = 128
        c.evals.max_examples = 128
        c.evals.batch_size = 64
    elif arg:
        raise ValueError(f"configs/demo.py: unknown arg {arg!r} (expected '' or 'tiny')")
    return c
