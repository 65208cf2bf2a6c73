"""The loss a config names: `loss.name` (which objective) and `loss.impl` (how it is computed)."""

from __future__ import annotations

from clipjax.losses.blockwise import ring_infonce_loss, ring_sigmoid_loss
from clipjax.losses.contrastive import alignment_only_loss, global_infonce_loss, global_sigmoid_loss
from clipjax.schema import Field, Section

LOSS_NAMES = ("softmax", "sigmoid", "alignment")
# gather: all-gather the other side, b x B logits per device. ring: blocks travel around a
# ppermute ring in tiles, O(b x chunk) logits per device, recomputed in the backward pass.
LOSS_IMPLS = ("gather", "ring")

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
):
    """Dispatch on `config.loss.name` and `config.loss.impl`; every form gives the same value and gradients."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss.impl: unknown implementation {impl!r} (expected one of {LOSS_IMPLS})")
    ring = impl == "ring"
    if name == "softmax":
        if ring:
            return ring_infonce_loss(img, txt, logit_scale, mesh=mesh, batch_axes=batch_axes, chunk=chunk)
        return global_infonce_loss(img, txt, logit_scale, mesh=mesh, batch_axes=batch_axes)
    if name == "sigmoid":
        if logit_bias is None:
            raise ValueError("loss.name='sigmoid' needs a bias: set model.logit_bias_init (e.g. -10.0)")
        if ring:
            return ring_sigmoid_loss(
                img, txt, logit_scale, logit_bias, mesh=mesh, batch_axes=batch_axes, chunk=chunk
            )
        return global_sigmoid_loss(img, txt, logit_scale, logit_bias, mesh=mesh, batch_axes=batch_axes)
    if name == "alignment":
        return alignment_only_loss(img, txt)
    raise ValueError(f"loss.name: unknown loss {name!r} (expected one of {LOSS_NAMES})")
