"""The objectives `loss.name` chooses from: each one registered, with its own `config.loss` fields,
by the file that holds its math (`register_objective`; the package imports them all).

An objective is a function of a `LossContext`: the embeddings of the global batch, the
temperature and bias, what the objective declared it `uses` of the batch (ids, labels, index),
its state if it keeps one, and how the loss is computed (`loss.impl`, chunk, precision; the
image-image mode `intra`). It returns the loss, or (loss, new state) when it has an
`init_state` (sogclr). `objective_loss` is the train step's entry point for every objective,
in both modes (image-text, and image-image SimCLR with `intra=True`); `contrastive_loss` runs
the plain image-text ones from loose arguments. `init_loss_state` creates, in its sharding, the
state a stateful objective carries from step to step; its arrays' shardings are the ones to
restore it into.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from clipjax.losses import captioning
from clipjax.schema import Field, Section

# gather: all-gather the other side, b x B logits per device. ring: blocks travel around a
# ppermute ring in tiles, O(b x chunk) logits per device, recomputed in the backward pass.
LOSS_IMPLS = ("gather", "ring")
# Matmul precision of the logits. On TPU and GPU a float32 matmul runs by default in bf16 or TF32
# passes (about 1e-3 relative error), which would undo the loss's exactness (and the centred
# temperature gradient); the loss is a small share of a step's FLOPs next to the towers, so it
# pays for full float32 unless told otherwise. CPUs compute float32 exactly at every setting.
PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}
BATCH_INPUTS = ("ids", "labels", "index")


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What an objective computes its loss from. a, b: [B, d] unit-norm embeddings sharded over
    batch_axes (image and text, or the two views with `intra`); ids: int [B], equal for the same
    caption (the dataset index in image-image mode); labels: int [B] concepts; index: int [B]
    dataset positions; the three and `loss_state` are None unless the objective asked for them.
    `settings`: the whole `config.loss` section, read ({} from `contrastive_loss`); `precision`:
    a `jax.lax.Precision`."""

    name: str
    settings: dict
    a: Any
    b: Any
    logit_scale: Any
    logit_bias: Any
    mesh: Any
    batch_axes: tuple
    impl: str
    chunk: int | None
    precision: Any
    intra: bool
    ids: Any = None
    labels: Any = None
    index: Any = None
    loss_state: Any = None

    @property
    def forms(self) -> dict:
        """Where and how to compute: the keywords the sharded loss functions take."""
        return {k: getattr(self, k) for k in ("mesh", "batch_axes", "impl", "chunk", "precision")}


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """One registered objective (see `register_objective`)."""

    loss: Callable[[LossContext], Any]
    fields: dict[str, Field]
    uses: tuple[str, ...]  # of BATCH_INPUTS
    init_state: Callable | None  # (num_examples, mesh, batch_axes) -> state tree
    checks: tuple[Callable, ...]  # (config) -> None; each raises a one-line ConfigError


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name, loss, *, fields=None, uses=(), init_state=None, checks=()):
    """Make `loss` (LossContext -> loss, or (loss, new state) with `init_state`) selectable as
    `loss.name = name`; `fields` join `config.loss`; `validate` calls each of `checks` on the config."""
    if set(uses) - set(BATCH_INPUTS):
        raise ValueError(f"objective {name!r} uses {uses}: expected some of {BATCH_INPUTS}")
    OBJECTIVES[name] = ObjectiveSpec(loss, dict(fields or {}), tuple(uses), init_state, tuple(checks))


def loss_section() -> Section:
    """`config.loss.*`: how the loss is computed, then every registered objective's settings."""
    fields = {
        "name": Field(
            "softmax",
            "InfoNCE, SigLIP's sigmoid, `alignment` (no negatives: collapses), or a false-negative-aware one",
            choices=tuple(OBJECTIVES),
        ),
        "impl": Field(
            "ring", "`ring`: O(B) memory (docs/large_batches.md); `gather`: b x B logits", choices=LOSS_IMPLS
        ),
        "chunk": Field(0, "ring: columns per tile (0: chosen from the block size)", minimum=0),
        "precision": Field(
            "highest",
            "matmul precision of the logits, forward and backward (`default`: bf16/TF32 passes on TPU/GPU)",
            choices=tuple(PRECISIONS),
        ),
    }
    for spec in OBJECTIVES.values():
        fields.update(spec.fields)
    fields.update(captioning.FIELDS)
    return Section(fields, doc="the contrastive loss over the global batch")


def check_loss_config(config) -> None:
    """The chosen objective's own checks against the rest of the config."""
    for check in OBJECTIVES[config.loss.name].checks:
        check(config)


def contrastive_loss(
    name: str,
    img,
    txt,
    logit_scale,
    logit_bias,
    *,
    mesh,
    batch_axes,
    impl: str = "gather",
    chunk: int | None = None,
    precision: str = "highest",
):
    """A plain image-text loss (softmax, sigmoid, alignment) by name; every `impl` gives the same
    value and gradients."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss.impl: unknown implementation {impl!r} (expected one of {LOSS_IMPLS})")
    spec = OBJECTIVES.get(name)
    if spec is None:
        raise ValueError(f"loss.name: unknown loss {name!r} (expected one of {tuple(OBJECTIVES)})")
    if spec.fields or spec.uses or spec.init_state:
        raise ValueError(f"loss.name={name!r} needs ids and state: call objective_loss")
    where = (mesh, batch_axes, impl, chunk, PRECISIONS[precision], False)
    return spec.loss(LossContext(name, {}, img, txt, logit_scale, logit_bias, *where))


def objective_loss(
    loss_config,
    a,
    b,
    logit_scale,
    logit_bias,
    *,
    ids,
    labels,
    index,
    loss_state,
    mesh,
    batch_axes,
    intra=False,
):
    """(loss, new loss_state) of the objective `config.loss` names, over the global batch (the
    arguments as in `LossContext`; loss_state: `init_loss_state`'s tree, {} if stateless)."""
    settings = loss_section().read(loss_config, "loss")
    spec = OBJECTIVES[settings["name"]]
    inputs = {k: v for k, v in dict(ids=ids, labels=labels, index=index).items() if k in spec.uses}
    if spec.init_state:
        inputs["loss_state"] = loss_state
    chunk, precision = settings["chunk"] or None, PRECISIONS[settings["precision"]]
    where = (mesh, batch_axes, settings["impl"], chunk, precision, intra)
    context = LossContext(settings["name"], settings, a, b, logit_scale, logit_bias, *where, **inputs)
    if spec.init_state:
        return spec.loss(context)
    return spec.loss(context), loss_state


def init_loss_state(loss_config, num_examples: int, mesh, batch_axes) -> dict:
    """The state `objective_loss` carries between steps, created in its sharding ({} if none)."""
    init = OBJECTIVES[loss_section().read(loss_config, "loss")["name"]].init_state
    return init(num_examples, mesh, batch_axes) if init else {}
