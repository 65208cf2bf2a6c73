"""Prototype heads of the image-side losses SigLIP 2 adds (self-distillation, masked prediction),
and the mask token of masked prediction.

Each head maps a feature to scores over `prototypes` learned directions, the way DINO and iBOT
do: an MLP to a small bottleneck, L2-normalised, then a linear layer without bias. The teacher
(an EMA of the image tower and these heads) and the student are compared through the
distributions these scores give (clipjax/losses/image_losses.py). Two heads: one for the pooled
image embedding (self-distillation of local crops towards the global view), one shared by every
patch token (masked prediction). `prototypes = 0` (the default) builds nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.models.layers import Dense, embed_normal, param
from clipjax.schema import Field

FIELDS: dict[str, Field] = {
    "prototypes": Field(
        0,
        "prototype scores of the self-distillation and masked-prediction heads (SigLIP 2's image "
        "losses, `image_losses`); 0: no heads",
        minimum=0,
    ),
    "hidden": Field(256, "hidden width of each head's MLP", minimum=1),
    "bottleneck": Field(64, "width each head normalises before its prototype layer", minimum=1),
}


@dataclasses.dataclass(frozen=True)
class ImageHeadsSpec:
    prototypes: int
    hidden: int
    bottleneck: int


def resolve(values: dict[str, Any]) -> ImageHeadsSpec | None:
    return None if not values["prototypes"] else ImageHeadsSpec(**{k: values[k] for k in FIELDS})


class PrototypeHead(nnx.Module):
    """features [..., width] -> prototype scores [..., prototypes] (float32)."""

    def __init__(self, width: int, spec: ImageHeadsSpec, *, rngs: nnx.Rngs):
        self.hidden = Dense(width, spec.hidden, names=("embed", "mlp"), rngs=rngs)
        self.bottleneck = Dense(spec.hidden, spec.bottleneck, names=("mlp", "proj"), rngs=rngs)
        self.prototypes = Dense(
            spec.bottleneck, spec.prototypes, names=("proj", "vocab"), use_bias=False, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.bottleneck(jax.nn.gelu(self.hidden(x.astype(jnp.float32))))
        h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-6)
        return self.prototypes(h)


class ImageHeads(nnx.Module):
    """The pooled-embedding head, the patch head and the mask token (at the tower's width)."""

    def __init__(self, spec: ImageHeadsSpec, *, pooled_width: int, token_width: int, rngs: nnx.Rngs):
        self.pooled = PrototypeHead(pooled_width, spec, rngs=rngs)
        self.patch = PrototypeHead(token_width, spec, rngs=rngs)
        self.mask_token = param(rngs, embed_normal, (token_width,), ("embed",))
