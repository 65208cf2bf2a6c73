"""The loss a config names: `loss.name` (which objective) and `loss.impl` (how it is computed)."""

from __future__ import annotations

import jax

from clipjax.losses.blockwise import ring_infonce_loss, ring_sigmoid_loss
from clipjax.losses.contrastive import alignment_only_loss, global_infonce_loss, global_sigmoid_loss
from clipjax.schema import Field, Section

LOSS_NAMES = ("softmax", "sigmoid", "alignment")
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

# `config.loss.*`.
SECTION = Section(
    {
        "name": Field(
            "softmax",
            "symmetric InfoNCE, SigLIP's sigmoid, or `alignment` (no negatives: collapses)",
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
    raise ValueError(f"loss.name: unknown loss {name!r} (expected one of {LOSS_NAMES})")
