"""LiT on the embedded `shapes` data: a locked image tower from the demo, a new text tower.

First train the demo (about 4 minutes on 2 CPU cores), then the LiT run from its weights:

    python -m clipjax.train --config configs/demo.py --workdir runs/demo
    python -m clipjax.train --config configs/lit_demo.py --workdir runs/lit --config.init_from=runs/demo

The image tower and the image projection come from the demo's last checkpoint
(`init_from_towers`) and stay frozen (`optim.frozen`): they get no gradient, no optimizer state
and no weight decay, so a step runs the image tower forward only. The text tower, its
projection and the temperature start afresh and learn to point at the demo's image embeddings
(Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", 2022). The temperature
trains: the demo's was learned against another text tower. The text tower uses the data's own
tokenizer, since none of the demo's text side is kept.

`--config configs/lit_demo.py:tiny` is a few steps without `init_from` (the tests run every
config without a trained demo): the image tower is then a frozen random initialisation.

Pod: v5e:2x2 (4 chips, the smallest slice; the demo itself runs on a CPU); checked by `python -m
clipjax.plan` (docs/scaling.md).
"""

import pathlib

from clipjax.cli import load_config_file


def _demo_config(arg: str):
    return load_config_file(f"{pathlib.Path(__file__).resolve().parent / 'demo.py'}:{arg}")


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/lit_demo.py: unknown arg {arg!r} (expected '' or 'tiny')")
    # The demo's model and data, so its image tower fits; only what LiT changes is set here.
    c = _demo_config(arg)
    c.init_from_towers = ("image_tower", "image_proj")
    c.optim.frozen = ("image_tower", "image_proj")
    if arg == "":
        c.steps = 300
        c.checkpoint_every = 300
    else:
        # No demo run to start from: a frozen random image tower, to exercise the same step.
        c.init_from_towers = ()
    return c
