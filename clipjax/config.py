"""The config schema and its checks: one clear line per mistake, before anything compiles.

Every config in `configs/` starts from `default_config()` and changes values. The defaults
define the schema: a key that is not here is a typo, reported with its dotted path.
"""
from __future__ import annotations

import math
import os

import ml_collections

from clipjax.losses.select import LOSS_IMPLS, LOSS_NAMES

LN_1_OVER_0_07 = math.log(1 / 0.07)


class ConfigError(ValueError):
    """A config mistake; the message is one line that names the key."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000              # total train steps (0: use epochs)
    c.epochs = 0.0
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.microbatches = 1            # >1: towers see the batch in this many pieces, loss on the whole (GradCache)
    c.max_nonfinite_streak = 20   # stop after this many consecutive non-finite steps (0: never)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.axes = ("data", "fsdp", "model")
    c.mesh.shape = (-1, 1, 1)   # -1: all remaining devices
    # Logical parameter axes -> mesh axes. FSDP shards the model width over 'fsdp'; tensor
    # parallelism (if the 'model' axis is > 1) splits MLP and attention heads.
    c.sharding_rules = (
        ("layers", None), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
        ("head_dim", None), ("vocab", None), ("patch", None), ("conv_h", None), ("conv_w", None),
        ("conv_in", None), ("conv_out", "fsdp"), ("proj", None), ("pos", None),
    )

    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes"
    c.data.data_dir = "data/tfds"
    c.data.source = ""          # image_text_folder: a folder or CSV of images and captions
    c.data.batch_size = 256     # global batch
    c.data.image_size = 32
    c.data.num_train = 50_000
    c.data.num_test = 5_000
    c.data.shapes_seed = 0        # shapes: the seed the dataset is rendered from
    c.data.test_fraction = 0.02   # image_text_folder: share of files held out as the test split
    c.data.shuffle_seed = 0
    c.data.worker_count = 0       # grain worker processes (0: batches built in a thread)
    c.data.read_threads = 1
    c.data.prefetch = 4
    c.data.max_bad_fraction = 0.01
    c.data.tokenizer = ml_collections.ConfigDict()
    c.data.tokenizer.kind = "sentencepiece"
    c.data.tokenizer.max_len = 12
    c.data.tokenizer.vocab_size = 128
    c.data.tokenizer.model_file = ""
    c.data.tokenizer.model_type = "word"   # sentencepiece trained on the captions: word | unigram | bpe

    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 64
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.logit_scale_init = LN_1_OVER_0_07
    c.model.logit_scale_max = math.log(100.0)
    c.model.logit_bias_init = ml_collections.config_dict.placeholder(float)
    c.model.image = ml_collections.ConfigDict()
    c.model.image.kind = "resnet"
    c.model.image.variant = ""
    # ViT fields (used when kind == 'vit'; 0 = take from variant)
    c.model.image.patch_size = 0
    c.model.image.width = 0
    c.model.image.depth = 0
    c.model.image.heads = 0
    c.model.image.mlp_dim = 0
    c.model.image.pool = "flatten"
    # ResNet fields (used when kind == 'resnet')
    c.model.image.stem_width = 32
    c.model.image.widths = (64, 128, 128)
    c.model.image.blocks_per_stage = 0
    c.model.image.groups = 8
    c.model.text = ml_collections.ConfigDict()
    c.model.text.variant = "tiny"
    c.model.text.width = 0
    c.model.text.depth = 0
    c.model.text.heads = 0
    c.model.text.mlp_dim = 0
    c.model.text.pool = "mean"
    c.model.text.causal = False

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "softmax"
    c.loss.impl = "ring"          # ring (O(B) memory) | gather; same values, see docs/large_batches.md
    c.loss.chunk = 0              # ring: columns per tile (0: chosen from the block size)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 1.0
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.warmup_fraction = 0.05
    c.optim.end_lr_fraction = 0.0

    c.evals = ml_collections.ConfigDict()
    c.evals.at_end = True
    c.evals.every = 0           # 0 = only at the end
    c.evals.batch_size = 500
    c.evals.max_examples = 2000
    c.evals.zero_shot = True
    c.evals.retrieval = True
    # Frozen image features: closed-form ridge linear probe and weighted kNN, fitted on the first
    # `probe_train_examples` of the train split and scored on the evaluation examples.
    c.evals.linear_probe = True
    c.evals.knn = True
    c.evals.probe_train_examples = 5000
    # Also evaluate on a tensorflow-datasets image-classification dataset already prepared in
    # `classification_data_dir` (e.g. 'cifar10'): zero-shot with its class names, probe and kNN.
    c.evals.classification = ""
    c.evals.classification_data_dir = ""

    c.metrics = ml_collections.ConfigDict()
    c.metrics.every = 50          # embedding metrics of the global batch every N steps (0: never)
    c.metrics.halt_on_collapse = False
    # Collapse alarm thresholds (clipjax.metrics.CollapseAlarm): effective rank below
    # min_rank_fraction x dim, or a drop of more than max_drop within `window` measurements;
    # complete collapse at rank <= complete_rank or uniformity > max_uniformity. Nothing is
    # judged in the first `warmup` measurements; a condition must hold `patience` times in a row.
    # Embeddings reorganise fast early on (the rank of a random initialisation falls as the first
    # attributes are learned): the alarm judges only from this step on. -1: after twice the
    # learning-rate warm-up and 10% of the run, whichever is later.
    c.metrics.alarm_start_step = -1
    c.metrics.min_rank_fraction = 0.1
    c.metrics.max_drop = 0.5
    c.metrics.window = 10
    c.metrics.warmup = 5
    c.metrics.patience = 2
    c.metrics.complete_rank = 1.5
    c.metrics.max_uniformity = -0.05
    return c


def _flatten(cfg, prefix=""):
    out = {}
    for key in cfg.keys():
        value = cfg[key] if not isinstance(cfg, ml_collections.ConfigDict) else cfg.get(key)
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def check_known_keys(config) -> None:
    schema = _flatten(default_config())
    schema_sections = {k.rsplit(".", 1)[0] for k in schema if "." in k}
    for key in sorted(_flatten(config)):
        if key not in schema and key not in schema_sections:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            siblings = {k[len(parent) + 1:].split(".")[0] for k in schema if k.startswith(parent + ".")}
            hint = f" (known keys in '{parent}': {', '.join(sorted(siblings))})" if parent in schema_sections else ""
            raise ConfigError(f"config: unknown key '{key}'{hint}")


def _choice(config, key: str, allowed) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {tuple(allowed)}")


def total_steps(config) -> int:
    if config.steps and config.steps > 0:
        return int(config.steps)
    if config.epochs and config.epochs > 0:
        return max(1, int(config.epochs * config.data.num_train // config.data.batch_size))
    raise ConfigError("steps: give a positive config.steps or config.epochs")


def validate(config, *, num_devices: int, process_count: int = 1) -> tuple[int, ...]:
    """Raise ConfigError on the first mistake; return the resolved mesh shape."""
    from clipjax.parallel.mesh import BATCH_AXES, resolve_mesh_shape

    check_known_keys(config)
    total_steps(config)
    _choice(config, "loss.name", LOSS_NAMES)
    _choice(config, "loss.impl", LOSS_IMPLS)
    _choice(config, "model.image.kind", ("vit", "resnet"))
    _choice(config, "model.dtype", ("float32", "bfloat16"))
    _choice(config, "optim.name", ("adamw", "lars"))
    _choice(config, "optim.schedule", ("cosine", "constant"))
    _choice(config, "data.name", ("shapes", "image_text_folder"))
    _choice(config, "data.tokenizer.kind", ("byte", "sentencepiece"))
    from clipjax.models import model_spec
    try:
        model_spec(config.model, image_size=int(config.data.image_size))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.loss.name == "sigmoid" and config.model.logit_bias_init is None:
        raise ConfigError("model.logit_bias_init: the sigmoid loss needs a bias (SigLIP uses -10.0)")

    axes = tuple(config.mesh.axes)
    unknown = [a for a in axes if a not in ("data", "fsdp", "model")]
    if unknown:
        raise ConfigError(f"mesh.axes: unknown axis {unknown[0]!r} (use 'data', 'fsdp', 'model')")
    try:
        shape = resolve_mesh_shape(axes, config.mesh.shape, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    parallel = math.prod(s for a, s in zip(axes, shape) if a in BATCH_AXES)
    batch = int(config.data.batch_size)
    if batch <= 0 or batch % parallel:
        raise ConfigError(
            f"data.batch_size={batch} is not divisible by the {parallel}-way batch parallelism of "
            f"mesh {dict(zip(axes, shape))} (data x fsdp)")
    if config.loss.impl == "ring" and config.loss.chunk and (batch // parallel) % config.loss.chunk:
        raise ConfigError(f"loss.chunk={config.loss.chunk} does not divide the per-device block of "
                          f"{batch // parallel} examples (data.batch_size / data x fsdp)")
    micro = int(config.microbatches)
    if micro < 1 or (batch // parallel) % micro:
        raise ConfigError(f"microbatches={micro} must be >= 1 and divide the per-device block of "
                          f"{batch // parallel} examples (data.batch_size / data x fsdp)")
    if batch % process_count:
        raise ConfigError(f"data.batch_size={batch} is not divisible by the {process_count} processes")

    if config.data.name == "image_text_folder":
        if not config.data.source or not os.path.exists(config.data.source):
            raise ConfigError(f"data.source: {config.data.source!r} does not exist (a folder or CSV of images and captions)")
    if config.data.name != "shapes" and not os.path.isdir(config.data.data_dir):
        raise ConfigError(f"data.data_dir: directory {config.data.data_dir!r} does not exist")
    if config.evals.classification:
        from clipjax.data.classification import get_builder
        try:
            get_builder(config.evals.classification, config.evals.classification_data_dir or config.data.data_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"evals.classification: {str(e).splitlines()[0]}") from None
    if config.data.tokenizer.model_file and not os.path.exists(config.data.tokenizer.model_file):
        raise ConfigError(f"data.tokenizer.model_file: {config.data.tokenizer.model_file!r} does not exist")
    return shape
