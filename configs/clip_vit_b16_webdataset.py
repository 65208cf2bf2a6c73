"""CLIP ViT-B/16 on webdataset shards in a bucket (img2dataset output: CC12M, LAION, ...).

    launch/tpu_pod.sh --config configs/clip_vit_b16_webdataset.py --workdir gs://BUCKET/clip_b16_cc12m \
        --config.data.shards='gs://BUCKET/cc12m/{00000..01242}.tar' \
        --config.data.eval_shards='gs://BUCKET/cc12m/{01243..01244}.tar'

Everything of `configs/clip_vit_b16.py` (ViT-B/16 and text-B, global batch 32,768, bfloat16
compute, FSDP over every device, remat, the softmax loss over the global batch), reading the
shards as they are, with no preparation step: each process streams its own subset of shards,
shuffles samples in a buffer, and decodes in one grain worker process per core
(docs/data.md). `epochs` counts the samples in the shards, which img2dataset's stats files
beside them give (`data.num_train` 0); without those files, set `data.num_train` to it. `:tiny` is `configs/clip_vit_b16.py:tiny`
(CPU size, embedded data), for the tests.

Pod: v5p:4x4x4 (64 chips; Cloud TPU v5p-128), as configs/clip_vit_b16.py; checked by `python -m
clipjax.plan` (docs/scaling.md).
"""

import importlib.util
import os


def _base_config(arg: str):
    # The sibling file, loaded by path: configs/ is not a package, and `--config FILE` loads
    # this file the same way.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vit_b16.py")
    spec = importlib.util.spec_from_file_location("_clip_vit_b16", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/clip_vit_b16_webdataset.py: unknown arg {arg!r} (expected '' or 'tiny')")
    c = _base_config(arg)
    if arg == "tiny":
        return c  # the base's CPU size, on the embedded data (no shards here to point at)
    c.data.name = "webdataset"
    c.data.source = ""
    c.data.shards = "gs://BUCKET/cc12m/{00000..01242}.tar"
    c.data.eval_shards = "gs://BUCKET/cc12m/{01243..01244}.tar"
    c.data.data_dir = "gs://BUCKET/clipjax_data"
    c.data.num_train = 0  # the shards' *_stats.json (CC12M as downloaded is about 10M pairs)
    # Enough samples in memory to mix several shards' worth: 10,000 samples of ~40 KB JPEGs is
    # about 400 MB per process.
    c.data.shuffle_buffer = 10_000
    c.data.shard_interleave = 8
    c.data.worker_count = -1  # one decoding process per core of each host
    return c
