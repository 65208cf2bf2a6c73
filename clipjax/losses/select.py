"""The loss a config names: `loss.name` (which objective) and `loss.impl` (how it is computed).

`contrastive_loss` computes the plain image-text losses; `objective_loss` is the train step's
entry point for every objective, in both modes (image-text, and image-image SimCLR with
`intra=True`), delegating the plain image-text ones to `contrastive_loss` so they stay exactly
as they were. `init_loss_state` creates, in its sharding, the state the stateful objectives
(sogclr) carry from step to step; its arrays' shardings are the ones to restore it into.
"""

from __future__ import annotations

import math

import jax

from clipjax.losses.blockwise import ring_infonce_loss, ring_sigmoid_loss
from clipjax.losses import sogclr
from clipjax.losses.contrastive import alignment_only_loss, global_infonce_loss, global_sigmoid_loss
from clipjax.losses.objectives import FNC_MODES, MULTI_POSITIVE_FORMS, Objective, objective_mean
from clipjax.schema import Field, Section

PLAIN_LOSSES = ("softmax", "sigmoid", "alignment")
# The false-negative-aware objectives (clipjax/losses/objectives.py, clipjax/losses/sogclr.py).
FALSE_NEGATIVE_LOSSES = ("multi_positive", "multi_positive_sigmoid", "fnc", "dcl", "soft_targets", "sogclr")
LOSS_NAMES = PLAIN_LOSSES + FALSE_NEGATIVE_LOSSES
POSITIVES = ("text_id", "label")
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


def _finite(value):
    return None if math.isfinite(value) else "expected a finite number"


def _below_one(value):
    return None if value < 1 else "must be below 1"


def _at_most_one(value):
    return None if value <= 1 else "must be at most 1"


def _positive(value):
    return None if value > 0 else "must be positive"


def _gamma(value):
    return None if 0 < value <= 1 else "must lie in (0, 1]"


# `config.loss.*`.
SECTION = Section(
    {
        "name": Field(
            "softmax",
            "InfoNCE, SigLIP's sigmoid, `alignment` (no negatives: collapses), or a false-negative-aware one",
            choices=LOSS_NAMES,
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
        "positives": Field(
            "text_id",
            "multi_positive(_sigmoid): ids that make positives (`label`: the concept, an oracle for studies)",
            choices=POSITIVES,
        ),
        "multi_positive_form": Field(
            "in",
            "`in`: -log of the positives' summed probability (never above InfoNCE); `out`: SupCon's mean",
            choices=MULTI_POSITIVE_FORMS,
        ),
        "fnc_mode": Field(
            "eliminate",
            "fnc: drop detected false negatives from the denominator, or attract them",
            choices=FNC_MODES,
        ),
        "fnc_top_k": Field(5, "fnc: a false negative is among the anchor's k most similar items", minimum=1),
        "fnc_threshold": Field(
            0.8, "fnc: ... whose cosine similarity with the anchor also reaches this", check=_finite
        ),
        "dcl_class_prior": Field(
            0.01,
            "dcl: tau+, the chance that a negative shares the anchor's class",
            minimum=0.0,
            check=_below_one,
        ),
        "soft_target_weight": Field(
            0.2,
            "soft_targets: alpha, the target mass spread by intra-modal similarity",
            minimum=0.0,
            check=_at_most_one,
        ),
        "soft_target_temperature": Field(
            0.1, "soft_targets: temperature of the intra-modal similarity softmax", check=_positive
        ),
        "sogclr_gamma": Field(
            0.9, "sogclr: weight of this step's negative sum in the per-example moving average", check=_gamma
        ),
    },
    doc="the contrastive loss over the global batch",
)


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
    """Dispatch on `config.loss.name` and `config.loss.impl`; every form gives the same value and gradients."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss.impl: unknown implementation {impl!r} (expected one of {LOSS_IMPLS})")
    ring = impl == "ring"
    where = dict(mesh=mesh, batch_axes=batch_axes, precision=PRECISIONS[precision])
    if name == "softmax":
        if ring:
            return ring_infonce_loss(img, txt, logit_scale, chunk=chunk, **where)
        return global_infonce_loss(img, txt, logit_scale, **where)
    if name == "sigmoid":
        if logit_bias is None:
            raise ValueError("loss.name='sigmoid' needs a bias: set model.logit_bias_init (e.g. -10.0)")
        if ring:
            return ring_sigmoid_loss(img, txt, logit_scale, logit_bias, chunk=chunk, **where)
        return global_sigmoid_loss(img, txt, logit_scale, logit_bias, **where)
    if name == "alignment":
        return alignment_only_loss(img, txt)
    if name in FALSE_NEGATIVE_LOSSES:
        raise ValueError(f"loss.name={name!r} needs ids and state: call objective_loss")
    raise ValueError(f"loss.name: unknown loss {name!r} (expected one of {LOSS_NAMES})")


def _objective(loss: dict, intra: bool) -> Objective:
    return Objective(
        loss["name"],
        intra=intra,
        multi_positive_form=loss["multi_positive_form"],
        fnc_mode=loss["fnc_mode"],
        fnc_top_k=loss["fnc_top_k"],
        fnc_threshold=loss["fnc_threshold"],
        dcl_class_prior=loss["dcl_class_prior"],
        soft_target_weight=loss["soft_target_weight"],
        soft_target_temperature=loss["soft_target_temperature"],
    )


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
    """(loss, new loss_state) of the objective `config.loss` names, over the global batch.

    a, b: [B, d] unit-norm embeddings sharded over batch_axes (image and text, or with
    `intra=True` the two views of SimCLR); ids: int [B], equal for the same caption (the
    dataset index in image-image mode); labels: int [B] concepts (read only when
    `loss.positives == "label"`); index: int [B] dataset positions (read by sogclr);
    loss_state: `init_loss_state`'s tree ({} for stateless objectives), returned updated.
    """
    loss = SECTION.read(loss_config, "loss")
    name = loss["name"]
    where = dict(mesh=mesh, batch_axes=batch_axes)
    chunk = loss["chunk"] or None
    if name in PLAIN_LOSSES and (not intra or name == "alignment"):
        value = contrastive_loss(
            name,
            a,
            b,
            logit_scale,
            logit_bias,
            impl=loss["impl"],
            chunk=chunk,
            precision=loss["precision"],
            **where,
        )
        return value, loss_state
    where.update(impl=loss["impl"], chunk=chunk, precision=PRECISIONS[loss["precision"]])
    obj = _objective(loss, intra)
    if name == "sogclr":
        gamma = loss["sogclr_gamma"]
        return sogclr.sogclr_loss(
            obj, a, b, logit_scale, index=index, loss_state=loss_state, gamma=gamma, **where
        )
    positive_ids = labels if loss["positives"] == "label" else ids
    value = objective_mean(
        obj, a, b, logit_scale, logit_bias, ids=positive_ids if obj.uses_ids else None, **where
    )
    return value, loss_state


def init_loss_state(loss_config, num_examples: int, mesh, batch_axes) -> dict:
    """The state `objective_loss` carries between steps, created in its sharding ({} if none)."""
    if SECTION.read(loss_config, "loss")["name"] == "sogclr":
        return sogclr.init_state(num_examples, mesh, batch_axes)
    return {}
