"""SigLIP 2's image-side losses: self-distillation of local crops towards an EMA teacher's global
view (after SILC), and masked prediction of the teacher's patch features (after TIPS).

Why: a contrastive (or sigmoid) loss only asks the pooled image embedding to match a caption,
so nothing asks the patch tokens to describe their own part of the image, and dense tasks
(segmentation, detection, the patch-level probe of clipjax's dense evaluator) get features that
were never trained for them. SigLIP 2 (Tschannen et al., 2025) adds, for the last 20% of
training, two losses that need no labels and look at parts of the image:

* Self-distillation (local -> global). The student embeds `local_views` random crops of each
  image (a share `local_crop_scale` of its area, resized to the model's resolution); the teacher
  embeds the whole image. Both pooled embeddings go through a prototype head
  (clipjax/models/image_heads.py), and the student's distribution over the prototypes is pulled
  towards the teacher's: cross-entropy -sum_k p_teacher(k) log p_student(k), the teacher's
  scores centred (minus a running mean of them, `center_momentum`) and sharpened (temperature
  `teacher_temperature` below the student's `student_temperature`), as DINO does so that the
  two cannot agree on one constant answer.
* Masked prediction. A share `mask_ratio` of each image's patches is replaced, before the
  student reads them, by a learned mask token; the student's output at each masked patch goes
  through the patch head and is pulled, by the same cross-entropy, towards the teacher's patch
  head output at that patch of the unmasked image. The mask is applied to the patch embeddings
  before the positions are added, so the student cannot see what it has to predict.

The teacher is an exponential moving average of the student's image tower and heads (kept in
the train state under `teacher`, updated after every optimizer step with a momentum that rises
from `teacher_momentum` to `teacher_momentum_final` on a cosine over the run), so it is a slow,
stable target; no gradient reaches it. Crops and masks are drawn on device from (seed, step, each
example's dataset index), as SimCLR's views are, so a resumed run, another mesh or another
micro-batching draws the same. Both losses are means over the global batch (and the masked
patches), so their gradients equal one device's; they are computed on the whole batch beside
the contrastive loss (whose micro-batching they do not change) and switch on at the step
`start` x steps, with `self_distillation` and `masked_prediction` as their weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from clipjax.data.augment import example_keys, random_crop_box, resized_crop
from clipjax.data.images import CROP_RATIO
from clipjax.schema import Field, Section


def _fraction(value) -> str | None:
    return None if 0.0 <= value <= 1.0 else "expected a fraction in [0, 1]"


def _open_fraction(value) -> str | None:
    return None if 0.0 < value < 1.0 else "expected a fraction strictly between 0 and 1"


def _crop_scale(value) -> str | None:
    if len(value) != 2 or not 0.0 < value[0] <= value[1] <= 1.0:
        return "expected (low, high) shares of the image's area with 0 < low <= high <= 1"
    return None


SECTION = Section(
    {
        "self_distillation": Field(
            0.0, "weight of the local-to-global self-distillation loss (0: off)", minimum=0.0
        ),
        "masked_prediction": Field(0.0, "weight of the masked-prediction loss (0: off)", minimum=0.0),
        "start": Field(
            0.8,
            "the two losses switch on at this fraction of the run's steps (SigLIP 2: 0.8)",
            check=_fraction,
        ),
        "local_views": Field(2, "local crops the student embeds per image (self-distillation)", minimum=1),
        "local_crop_scale": Field(
            (0.1, 0.4), "(low, high) share of the image's area a local crop covers", check=_crop_scale
        ),
        "mask_ratio": Field(
            0.5, "share of each image's patches masked (masked prediction)", check=_open_fraction
        ),
        "teacher_momentum": Field(
            0.996, "EMA momentum of the teacher at the first step", check=_open_fraction
        ),
        "teacher_momentum_final": Field(
            1.0, "...rising on a cosine to this at the last step", check=_fraction
        ),
        "teacher_temperature": Field(0.04, "temperature of the teacher's prototype scores", minimum=1e-6),
        "student_temperature": Field(0.1, "temperature of the student's prototype scores", minimum=1e-6),
        "center_momentum": Field(
            0.9, "momentum of the running mean subtracted from the teacher's scores", check=_fraction
        ),
    },
    doc="SigLIP 2's image-side losses: self-distillation and masked prediction against an EMA "
    "teacher (docs/siglip2.md); needs model.image_heads",
)


# The parts of the model the EMA teacher copies (the train state's `teacher`, beside its centres).
TEACHER_PARTS = ("image_tower", "image_heads")


def active(config) -> bool:
    c = config.image_losses
    return bool(c.self_distillation or c.masked_prediction)


def start_step(config, total: int) -> int:
    return int(math.floor(float(config.image_losses.start) * total))


def teacher_momentum(config, step, total: int) -> jax.Array:
    """The EMA momentum at `step`: `teacher_momentum` rising on a cosine to the final one."""
    c = config.image_losses
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total - 1, 1), 0.0, 1.0)
    first, last = float(c.teacher_momentum), float(c.teacher_momentum_final)
    return last - (last - first) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def local_views(images, index, *, seed: int, step, count: int, scale) -> list[jax.Array]:
    """`count` float32 [B, H, W, 3] crops in [0, 1] of uint8 images, each example's drawn from
    (seed, step, its index, view)."""
    floats = images.astype(jnp.float32) / 255.0
    h, w = images.shape[1], images.shape[2]
    views = []
    for v in range(count):
        # Views 1000.. keep these keys apart from the image-image views (0, 1).
        keys = example_keys(index, seed=seed, step=step, view=1000 + v)
        boxes = jax.vmap(lambda k: random_crop_box(k, h, w, tuple(scale), CROP_RATIO))(keys)
        views.append(jax.vmap(resized_crop)(floats, boxes))
    return views


def patch_masks(index, *, seed: int, step, patches: int, ratio: float) -> jax.Array:
    """bool [B, patches]: round(ratio x patches) of each example's patches, drawn from (seed,
    step, its index)."""
    masked = max(1, min(patches - 1, round(ratio * patches)))
    keys = example_keys(index, seed=seed, step=step, view=2000)
    ranks = jax.vmap(lambda k: jnp.argsort(jnp.argsort(jax.random.uniform(k, (patches,)))))(keys)
    return ranks < masked


def prototype_cross_entropy(student, teacher, center, student_temperature, teacher_temperature):
    """[...]: -sum_k p_teacher(k) log p_student(k) of scores [..., K], the teacher's centred by
    `center` [K] and sharpened; no gradient reaches the teacher."""
    target = jax.nn.softmax(jax.lax.stop_gradient((teacher - center) / teacher_temperature), axis=-1)
    return -jnp.sum(target * jax.nn.log_softmax(student / student_temperature, axis=-1), axis=-1)


def _patch_tokens(tokens: jax.Array, patches: int) -> jax.Array:
    # A class token, where the tower has one, comes first.
    return tokens[:, tokens.shape[1] - patches :]


def image_losses(student, teacher, images, index, centers, *, config, step):
    """(self-distillation loss, masked-prediction loss, the teacher's mean scores {pooled, patch}
    for the centres' update) of a batch: `student` and `teacher` are DualEncoders (the teacher's
    image tower and heads the EMA ones)."""
    c = config.image_losses
    t_s, t_t = float(c.student_temperature), float(c.teacher_temperature)
    tower, t_tower = student.image_tower, teacher.image_tower
    patches = tower.num_patches
    t_pooled, t_tokens = t_tower.encode(teacher._standardize(images))
    t_pooled = jax.lax.stop_gradient(t_pooled.astype(jnp.float32))
    t_patch = jax.lax.stop_gradient(teacher.image_heads.patch(_patch_tokens(t_tokens, patches)))
    t_global = jax.lax.stop_gradient(teacher.image_heads.pooled(t_pooled))
    zero = jnp.zeros((), jnp.float32)
    distill, masked = zero, zero
    if c.self_distillation:
        views = local_views(
            images, index, seed=config.seed, step=step, count=int(c.local_views), scale=c.local_crop_scale
        )
        terms = []
        for view in views:
            pooled, _ = tower.encode(student._standardize(view))
            scores = student.image_heads.pooled(pooled.astype(jnp.float32))
            terms.append(jnp.mean(prototype_cross_entropy(scores, t_global, centers["pooled"], t_s, t_t)))
        distill = sum(terms) / len(terms)
    if c.masked_prediction:
        mask = patch_masks(index, seed=config.seed, step=step, patches=patches, ratio=float(c.mask_ratio))
        _, tokens = tower.encode(student._standardize(images), mask, student.image_heads.mask_token[...])
        scores = student.image_heads.patch(_patch_tokens(tokens, patches))
        per_patch = prototype_cross_entropy(scores, t_patch, centers["patch"], t_s, t_t)
        masked = jnp.sum(per_patch * mask) / jnp.sum(mask)
    means = {"pooled": jnp.mean(t_global, axis=0), "patch": jnp.mean(t_patch, axis=(0, 1))}
    return distill, masked, means
