"""False negatives: in-batch samples that share the anchor's key (same caption or same concept).

The contrastive losses treat every other sample as a negative; when two samples have the same
`text_id` (or `label`) that negative is false and the loss pushes apart things that should match.
These metrics say how often that happens and how much softmax mass the loss spends on it. A key
< 0 means unknown (e.g. `label` of folder data) and never collides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipjax.metrics.geometry import logits


def same_key_mask(row_keys: jax.Array, col_keys: jax.Array, off_diagonal: jax.Array) -> jax.Array:
    """[rows, cols] True where a different sample has the anchor's (known) key."""
    row_keys = row_keys[:, None]
    return (row_keys == col_keys[None, :]) & (row_keys >= 0) & off_diagonal


def collision_sums(same: jax.Array, z: jax.Array) -> dict[str, jax.Array]:
    """Sums over the anchors (rows) of count, has-any and same-key softmax mass; divide by B for means.

    `z` holds each anchor's logits against every text of the batch, so the row softmax is the
    image -> text distribution of the softmax loss (a bias shifts a whole row and cancels).
    """
    count = jnp.sum(same, axis=1).astype(jnp.float32)
    mass = jnp.sum(jnp.where(same, jax.nn.softmax(z, axis=1), 0.0), axis=1)
    return {
        "collision_count_mean": jnp.sum(count),
        "collision_frac": jnp.sum((count > 0).astype(jnp.float32)),
        "collision_prob_mass": jnp.sum(mass),
    }


def collision_stats(
    img: jax.Array, txt: jax.Array, keys: jax.Array, logit_scale, logit_bias=None
) -> dict[str, jax.Array]:
    """Single-device reference: mean same-key count per anchor, fraction of anchors with one, mean mass."""
    n = img.shape[0]
    same = same_key_mask(keys, keys, ~jnp.eye(n, dtype=bool))
    sums = collision_sums(same, logits(img, txt, logit_scale, logit_bias))
    return {k: v / n for k, v in sums.items()}


def expected_collision_rate(batch: int, num_classes: int) -> float:
    """Chance that an anchor has at least one same-key sample in a batch, keys uniform over K classes."""
    return 1.0 - (1.0 - 1.0 / num_classes) ** (batch - 1)


def expected_collision_count(batch: int, num_classes: int) -> float:
    """Expected number of same-key samples per anchor, keys uniform over K classes: (B - 1) / K."""
    return (batch - 1) / num_classes
