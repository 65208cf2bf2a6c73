"""Fine-tune a converted CLIP / SigLIP checkpoint on your own image-text data.

    python -m clipjax.convert import --format hf_clip --checkpoint clip-vit-base-patch16/ --out runs/clip_b16
    python -m clipjax.train --config configs/finetune_pretrained.py:runs/clip_b16 --workdir runs/ft \
        --config.data.source=~/photos/captions.csv --config.data.data_dir=~/clipjax_data
    # the same on the embedded dataset, no CSV of your own needed:
    python -m clipjax.train --config configs/finetune_pretrained.py:runs/clip_b16 --workdir runs/ft_shapes \
        --config.data.name=shapes --config.data.data_dir=~/clipjax_data

`arg` is the converted workdir (docs/pretrained.md): its architecture, tokenizer, image size and
image statistics are taken over and its weights initialise the run (`init_from`); the data is
yours (`data.name=image_text_folder` by default, any source works), trained with a small
learning rate and short warm-up, evaluated on its held-out split as any run is. `:tiny` (and the
empty arg, for the tests) gives the same settings on the demo's tiny model without a checkpoint.

Pod: none of its own: the pod of the converted model's architecture (docs/scaling.md lists the
shipped ones; `python -m clipjax.plan --config configs/finetune_pretrained.py:WORKDIR --topology
...` checks it).
"""

import os

from clipjax.config import default_config


def get_config(arg: str = ""):
    if arg in ("", "tiny"):
        c = default_config()  # the demo's tiny towers stand in for the converted model
        if arg == "tiny":
            c.steps = 2
            c.data.num_train, c.data.num_test, c.data.batch_size = 256, 64, 32
            c.evals.max_examples = 64
    else:
        from clipjax.api import load_run_config

        c = load_run_config(os.path.expanduser(arg))
        c.init_from = arg
        for name in ("zero_shot", "retrieval", "linear_probe", "knn", "embedding"):
            getattr(c.evals, name).enabled = True  # a converted config has them off
        c.data.name = "image_text_folder"
        c.data.source = "/path/to/captions.csv"
        c.data.num_train = 0  # the CSV's count, not the converted run's
        c.steps = 0
        c.epochs = 5.0
        c.data.batch_size = 256
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.1
    c.optim.warmup_fraction = 0.05
    c.optim.end_lr_fraction = 0.0
    return c
