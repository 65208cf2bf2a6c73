"""SigLIP ViT-B/16: sigmoid loss over all pairs of the global batch, for a large mesh.

    python -m clipjax.train --config configs/siglip_vit_b16.py --workdir gs://BUCKET/siglip_b16
    launch/tpu_pod.sh --config configs/siglip_vit_b16.py --workdir gs://BUCKET/siglip_b16

Everything but the loss, its initialisation, the image statistics and the optimizer follows
configs/clip_vit_b16.py; `:tiny` runs one step on CPU.

Pod: v5e:16x16 (256 chips, a full v5e pod: v5litepod-256), 128 examples per chip; checked by `python
-m clipjax.plan` (docs/scaling.md).
"""

import importlib.util
import math
import os


def _clip_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vit_b16.py")
    spec = importlib.util.spec_from_file_location("clip_vit_b16", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = ""):
    c = _clip_config(arg)
    c.loss.name = "sigmoid"
    # SigLIP's initialisation: t' = ln 10 and bias -10, so the first logits are mostly negative.
    c.model.logit_scale_init = math.log(10.0)
    c.model.logit_bias_init = -10.0
    c.model.image.pool = "map"
    # SigLIP's preprocessing maps pixels to [-1, 1]: (x - 0.5) / 0.5.
    c.model.image_mean = (0.5, 0.5, 0.5)
    c.model.image_std = (0.5, 0.5, 0.5)
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-4
    return c
