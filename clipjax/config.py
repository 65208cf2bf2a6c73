"""The config schema, assembled from the declarations of the modules that read each section,
and its checks: one clear line per mistake, before anything compiles.

    default_config()            every field with its default (configs/*.py start from it)
    validate(config, ...)       unknown keys, types, choices, then the cross-section checks
    config_from_dict(d)         a stored config.json back into a typed ConfigDict
    apply_overrides(c, {...})   dotted-key overrides, as the command line gives them

Where each section is declared: `model` in clipjax/models/spec.py (and the towers' files),
`data` in clipjax/data/sources/ (common fields, one set per source, the tokenizer's), `augment`
(image-image views) in clipjax/data/augment.py,
`evals` in clipjax/evals/runner.py (and each evaluator's file), `loss` in losses/registry.py
(and each objective's file), `optim` in optim.py, the collapse alarm's thresholds in
metrics/collapse.py, `logging` in wandb_writer.py; the rest below.
`python -m clipjax.config` prints the field table of docs/configs.md (`--update FILE` rewrites it).
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any, Callable

import ml_collections
from flax import nnx

from clipjax import optim, paths
from clipjax.data.augment import SECTION as AUGMENT_SECTION
from clipjax.data.sources import data_section, source_class
from clipjax.evals.runner import check_evaluators, evals_section
from clipjax.losses import check_loss_config, image_losses, loss_section
from clipjax.metrics.collapse import ALARM_FIELDS
from clipjax.models import model_factory, model_section
from clipjax.models.spec import TASKS, config_model_spec, naflex_seq_lens
from clipjax.parallel.activations import DEFAULT_ACTIVATION_RULES, check_rules as check_activation_rules
from clipjax.parallel.mesh import BATCH_AXES, resolve_mesh_shape
from clipjax.schema import ConfigError, Field, Section, is_finite
from clipjax.wandb_writer import SECTION as LOGGING_SECTION, check_config as check_logging

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_json",
    "default_config",
    "schema",
    "validate",
]

MESH_AXES = ("data", "fsdp", "model")


def _known_axes(axes) -> str | None:
    unknown = [a for a in axes if a not in MESH_AXES]
    return f"unknown axis {unknown[0]!r} (use 'data', 'fsdp', 'model')" if unknown else None


def _part_names(value) -> str | None:
    bad = [v for v in value if not isinstance(v, str) or not v or "/" in v]
    return f"expected names of top-level parts of the model, not {bad[0]!r}" if bad else None


def param_names(config) -> list[str]:
    """The '/'-joined path of every parameter of `config.model` (from an abstract model: cheap)."""
    model = nnx.eval_shape(model_factory(config, vocab_size=256))  # names do not depend on the vocabulary
    return optim.param_names(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _check_parameter_choices(config) -> None:
    """`optim.frozen`, `optim.lr_multipliers` and `init_from_towers` name parameters that exist."""
    names = param_names(config)
    optim.check_patterns(config.optim, names)
    parts = sorted({n.split("/")[0] for n in names})
    for part in config.init_from_towers:
        if part not in parts:
            raise ConfigError(
                f"init_from_towers: {part!r} is not a part of the model (parts: {', '.join(parts)})"
            )
    if config.init_from_towers and not config.init_from:
        raise ConfigError(
            f"init_from_towers: {tuple(config.init_from_towers)!r} are taken from `init_from`, which is not set "
            "(give --config.init_from=WORKDIR)"
        )


def schema() -> Section:
    """The whole config, top to bottom. Built on each call: registered plug-ins add fields."""
    return Section(
        {
            "seed": Field(0, "parameter initialisation and data order"),
            "task": Field(
                "image_text",
                "`image_text`: CLIP's two towers; `image_image`: SimCLR, two augmented views of each image "
                "(`augment`), the image tower and `model.projector` (docs/false_negatives.md)",
                choices=TASKS,
            ),
            "steps": Field(1000, "train steps (0: use `epochs`)", minimum=0),
            "epochs": Field(0.0, "run length in passes over `data.num_train` when `steps` is 0", minimum=0.0),
            "log_every": Field(50, "write metrics.jsonl / TensorBoard every N steps", minimum=1),
            "peak_tflops": Field(
                0.0,
                "peak TFLOP/s per device for `mfu` (0: from the device table in clipjax/flops.py)",
                minimum=0.0,
            ),
            "checkpoint_every": Field(500, "checkpoint every N steps (and at the end)", minimum=1),
            "keep_checkpoints": Field(3, "checkpoints kept", minimum=1),
            "microbatches": Field(
                1, "k > 1: towers see the batch in k pieces, the loss all of it (GradCache)", minimum=1
            ),
            "max_nonfinite_streak": Field(
                20, "stop after this many consecutive non-finite steps (0: never)", minimum=0
            ),
            "init_from": Field(
                "", "a workdir whose latest weights start this (new) run; optimizer state is fresh"
            ),
            "init_from_towers": Field(
                (),
                "top-level parts of the model taken from `init_from` (`('image_tower', 'image_proj')`); "
                "the others keep their fresh initialisation; empty: all of them",
                type=tuple,
                check=_part_names,
            ),
            "resume": Section(
                {
                    "allow_changes": Field(
                        "", "comma-separated keys that may differ from the config of the run being resumed"
                    ),
                },
                doc="resuming a workdir with a changed config (docs/checkpoints.md)",
            ),
            "mesh": Section(
                {
                    "axes": Field(MESH_AXES, "mesh axis names", check=_known_axes),
                    "shape": Field((-1, 1, 1), "devices per axis; -1: all remaining devices"),
                },
                doc="the device mesh (docs/sharding.md)",
            ),
            # Logical parameter axes -> mesh axes. FSDP shards the model width over 'fsdp'; tensor
            # parallelism (if the 'model' axis is > 1) splits MLP and attention heads.
            "sharding_rules": Field(
                (
                    ("layers", None),
                    ("embed", "fsdp"),
                    ("mlp", "model"),
                    ("heads", "model"),
                    ("head_dim", None),
                    ("vocab", None),
                    ("patch", None),
                    ("conv_h", None),
                    ("conv_w", None),
                    ("conv_in", None),
                    ("conv_out", "fsdp"),
                    ("proj", None),
                    ("pos", None),
                ),
                "logical parameter axis -> mesh axis pairs",
            ),
            # Logical activation axes -> mesh axes (clipjax/parallel/activations.py): the batch is
            # split over data x fsdp at every block boundary, so adding chips spreads it.
            "activation_rules": Field(
                DEFAULT_ACTIVATION_RULES,
                "logical activation axis -> mesh axis pairs (batch, length, act_embed, act_heads, act_mlp); "
                "empty: every activation layout left to the compiler (docs/scaling.md)",
                check=check_activation_rules,
            ),
            "data": data_section(),
            "augment": AUGMENT_SECTION,
            "model": model_section(),
            "loss": loss_section(),
            "image_losses": image_losses.SECTION,
            "optim": optim.SECTION,
            "evals": evals_section(),
            "profile": Section(
                {
                    "start_step": Field(
                        0, "first step traced by jax.profiler into <workdir>/profile (0: off)", minimum=0
                    ),
                    "steps": Field(5, "steps traced", minimum=1),
                },
                doc="a profiler trace of a few steps (docs/performance.md)",
            ),
            "metrics": Section(
                {
                    "every": Field(
                        50, "embedding metrics of the global batch every N steps (0: never)", minimum=0
                    ),
                    "halt_on_collapse": Field(False, "stop the run when the collapse alarm fires"),
                    # Embeddings reorganise fast early on (the rank of a random initialisation
                    # falls as the first attributes are learned): judge only from this step on.
                    "alarm_start_step": Field(
                        -1, "the alarm judges from this step (-1: after twice the warm-up and 10% of the run)"
                    ),
                    **ALARM_FIELDS,
                },
                doc="embedding-spectrum metrics and the collapse alarm (docs/metrics.md)",
            ),
            "logging": LOGGING_SECTION,
        }
    )


def default_config() -> ml_collections.ConfigDict:
    return schema().to_config()


def total_steps(config) -> int:
    if config.steps and config.steps > 0:
        return int(config.steps)
    if config.epochs and config.epochs > 0:
        return max(1, int(config.epochs * config.data.num_train // config.data.batch_size))
    raise ConfigError("steps: give a positive config.steps or config.epochs")


def validate(config, *, num_devices: int, process_count: int = 1, check_data: bool = True) -> tuple[int, ...]:
    """Raise ConfigError on the first mistake; return the resolved mesh shape. `check_data=False`
    skips what concerns this host's files (the data source, tokenizer files): what `clipjax.plan`
    compiles for a pod does not read them."""
    schema().read(config)
    total_steps(config)
    config_model_spec(config)
    check_loss_config(config)
    _check_captioning(config)
    _check_image_losses(config)
    _check_naflex(config)

    axes = tuple(config.mesh.axes)
    try:
        shape = resolve_mesh_shape(axes, config.mesh.shape, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    parallel = math.prod(s for a, s in zip(axes, shape) if a in BATCH_AXES)
    batch = int(config.data.batch_size)
    if batch % parallel:
        raise ConfigError(
            f"data.batch_size={batch} is not divisible by the {parallel}-way batch parallelism of "
            f"mesh {dict(zip(axes, shape))} (data x fsdp)"
        )
    if config.loss.impl == "ring" and config.loss.chunk and (batch // parallel) % config.loss.chunk:
        raise ConfigError(
            f"loss.chunk={config.loss.chunk} does not divide the per-device block of "
            f"{batch // parallel} examples (data.batch_size / data x fsdp)"
        )
    if (batch // parallel) % config.microbatches:
        raise ConfigError(
            f"microbatches={config.microbatches} must divide the per-device block of "
            f"{batch // parallel} examples (data.batch_size / data x fsdp)"
        )
    if batch % process_count:
        raise ConfigError(f"data.batch_size={batch} is not divisible by the {process_count} processes")
    if check_data:
        _check_data_files(config)
    check_evaluators(config)
    check_logging(config.logging)
    if config.optim.frozen or config.optim.lr_multipliers or config.init_from_towers:
        _check_parameter_choices(config)
    return shape


def _check_image_losses(config) -> None:
    c = config.image_losses
    for key in ("self_distillation", "masked_prediction"):
        if c[key] and not config.model.image_heads.prototypes:
            raise ConfigError(
                f"image_losses.{key}: compares prototype scores, which need heads: set "
                "model.image_heads.prototypes (e.g. 1024)"
            )


def _check_naflex(config) -> None:
    """What NaFlex patch batches (clipjax.data.naflex) do not go with."""
    if not naflex_seq_lens(config):
        if config.data.get("naflex_seq_lens"):
            raise ConfigError(
                "data.naflex_seq_lens: sequence lengths are for a NaFlex model (model.image.naflex=True)"
            )
        return
    if config.task != "image_text":
        raise ConfigError(
            f"task: {config.task!r} draws square views on device; a NaFlex model (model.image.naflex) "
            "trains on image-text batches"
        )
    if not source_class(config.data.name).supports_naflex:
        raise ConfigError(
            f"model.image.naflex: the data.name={config.data.name!r} source gives no NaFlex patch batches"
        )


def _check_captioning(config) -> None:
    if config.model.decoder.variant == "none":
        return
    if not config.loss.caption_weight:
        raise ConfigError(
            "loss.caption_weight: 0 leaves model.decoder untrained (set model.decoder.variant='none' "
            "for no decoder)"
        )
    if config.model.decoder.tasks == "locca" and not source_class(config.data.name).gives_boxes(config.data):
        raise ConfigError(
            f"model.decoder.tasks: 'locca' trains on object boxes, which data.name={config.data.name!r} "
            "does not give here (shapes: data.shapes_boxes=True)"
        )


def _check_data_files(config) -> None:
    source_class(config.data.name).check_config(config.data)
    tokenizer = config.data.tokenizer
    used = {"sentencepiece": "model_file", "clip_bpe": "vocab_file", "hf": "tokenizer_file"}.get(
        tokenizer.kind
    )
    for key in ("model_file", "vocab_file", "tokenizer_file"):
        path = tokenizer.get(key, "")
        if key == used and path and not paths.exists(path):  # a local file or a bucket URL
            raise ConfigError(f"data.tokenizer.{key}: {path!r} does not exist")


# ----------------------------------------------------------------------------------------------
# Keys that moved. Each old key maps its value to the new keys' values; the command line, stored
# config.json files and `apply_overrides` all accept the old spelling.


def _probe_examples(n):
    return {f"evals.{name}.train_examples": n for name in ("linear_probe", "knn", "classification")}


LEGACY_KEYS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "evals.zero_shot": lambda v: {"evals.zero_shot.enabled": v},
    "evals.retrieval": lambda v: {"evals.retrieval.enabled": v},
    "evals.linear_probe": lambda v: {"evals.linear_probe.enabled": v},
    "evals.knn": lambda v: {"evals.knn.enabled": v},
    "evals.probe_train_examples": _probe_examples,
    "evals.classification": lambda v: {
        "evals.classification.dataset": v,
        "evals.classification.enabled": bool(v),
    },
    "evals.classification_data_dir": lambda v: {"evals.classification.data_dir": v},
}


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': value} for every leaf of a (nested) ConfigDict or dict."""
    out = {}
    items = values.items() if hasattr(values, "items") else ()
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_json(config, *, indent: int | None = 2) -> str:
    """The config as strict JSON (config.json, a checkpoint's meta). JSON has no NaN or infinity
    (Python would write the bare tokens `NaN` / `Infinity`, which other readers refuse): such a
    value is a ConfigError naming its key, though `validate` refuses them before this is reached."""
    values = config.to_dict() if hasattr(config, "to_dict") else config
    for key, value in flatten(values).items():
        if not is_finite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return json.dumps(values, indent=indent, default=str, allow_nan=False)


def _tuples(value: Any) -> Any:
    """JSON's lists back into the tuples a config holds, at every depth (rules nest them)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    target = config
    for i, part in enumerate(parents):
        if part not in target:
            if ".".join(parents[: i + 1]).startswith("evals."):
                # A user-named evaluator section: created here, checked by `validate`.
                target[part] = ml_collections.ConfigDict()
            else:
                raise ConfigError(f"{'.'.join(parents[: i + 1])}: unknown section in override {key!r}")
        target = target[part]
    if isinstance(value, list):
        value = _tuples(value)
    try:
        target[leaf] = value
    except TypeError as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """Set dotted keys ('model.embed_dim': 32, ...) in place; old key spellings are translated."""
    for key, value in overrides.items():
        for new_key, new_value in (LEGACY_KEYS[key](value) if key in LEGACY_KEYS else {key: value}).items():
            _set(config, new_key, new_value)
    return config


def config_from_dict(stored: dict) -> ml_collections.ConfigDict:
    """A config.json (of this or an older version) as a typed ConfigDict: the defaults with the
    stored values set over them, so command-line overrides of unset fields keep their types."""
    flat = flatten(stored)
    legacy = {k: v for k, v in flat.items() if k in LEGACY_KEYS}
    current = {k: v for k, v in flat.items() if k not in LEGACY_KEYS}
    config = default_config()
    # Old spellings first: a stored new spelling wins over a translated old one.
    apply_overrides(config, legacy)
    apply_overrides(config, current)
    return config


def translate_legacy_flags(argv: list[str]) -> list[str]:
    """`--config.evals.zero_shot=False` and the other old keys as the flags of their new keys."""
    out = []
    for arg in argv:
        key, sep, text = arg.partition("=")
        name = key[len("--config.") :] if key.startswith("--config.") else None
        if not sep or name not in LEGACY_KEYS:
            out.append(arg)
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        for new_key, new_value in LEGACY_KEYS[name](value).items():
            out.append(f"--config.{new_key}={new_value}")
    return out


def markdown_table() -> str:
    """The field table of docs/configs.md."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |", *schema().markdown_rows()]
    return "\n".join(rows) + "\n"


DOC_BEGIN, DOC_END = "<!-- fields: python -m clipjax.config -->\n", "<!-- end fields -->"


def update_doc(path: str) -> None:
    """Rewrite the field table between the markers of docs/configs.md."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(DOC_BEGIN, 1)
    with open(path, "w") as f:
        f.write(head + DOC_BEGIN + markdown_table() + DOC_END + rest.split(DOC_END, 1)[1])


if __name__ == "__main__":
    import sys

    # `python -m clipjax.config` prints the table; `... --update docs/configs.md` rewrites it there.
    if sys.argv[1:2] == ["--update"]:
        update_doc(sys.argv[2])
    else:
        print(markdown_table(), end="")
