"""The train step: loss over the global batch, gradients (optionally micro-batched), update."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import optim
from clipjax.config import total_steps
from clipjax.losses import image_losses, objective_loss
from clipjax.losses.image_losses import TEACHER_PARTS
from clipjax.losses.captioning import caption_token_count, caption_token_losses
from clipjax.models import locca
from clipjax.models.naflex import Patches
from clipjax.metrics import embedding_metrics
from clipjax.parallel import batch_axes, batch_parallelism
from clipjax.parallel.activations import activation_sharding


def make_loss_fn(config, graphdef, mesh):
    """loss(params, batch, loss_state=None, step=0) -> (loss, (a, b, new_loss_state, parts))
    over the global batch.

    (a, b) are the embeddings the loss compares: images and texts, or (`task = 'image_image'`)
    the projections of two augmented views of each image. The towers run under jit's automatic
    partitioning; the loss inside a shard_map. With a captioning decoder the loss is
    `loss.contrastive_weight` x the contrastive objective + `loss.caption_weight` x the
    captioning cross-entropy, and `parts` holds the two unweighted ({} without a decoder).
    """
    embedding_loss = make_embedding_loss(config, mesh)
    embed = make_embed_fn(config, graphdef)
    weights = caption_weights(config)

    def loss_fn(params, batch, loss_state=None, step=0):
        args = (params["logit_scale"], params.get("logit_bias"), batch, loss_state or {})
        if weights is None:
            a, b = embed(params, batch, step)
            loss, new_state = embedding_loss(a, b, *args)
            return loss, (a, b, new_state, {})
        model = nnx.merge(graphdef, params)
        batch = with_task_sequences(model, batch, weights, config.seed, step)
        a, b, caption_sum = embed_and_caption_sum(model, batch, weights)
        contrastive, new_state = embedding_loss(a, b, *args)
        caption = caption_sum / _token_count(batch)
        loss = weights.contrastive * contrastive + weights.caption * caption
        return loss, (a, b, new_state, {"contrastive_loss": contrastive, "caption_loss": caption})

    return loss_fn


@dataclasses.dataclass(frozen=True)
class CaptionWeights:
    contrastive: float
    caption: float
    label_smoothing: float
    vocab_chunk: int
    locca_tasks: tuple[float, float, float]


# The batch keys of LocCa's task sequences, which micro-batches split like the towers' inputs.
SEQUENCE_KEYS = ("task_tokens", "task_targets")


def with_task_sequences(model, batch, weights: CaptionWeights, seed: int, step):
    """The batch with each example's LocCa task sequence (`clipjax.models.locca`) where the
    decoder trains on LocCa's tasks; the batch itself otherwise."""
    layout = locca.locca_tokens(model.decoder)
    if layout is None:
        return batch
    boxes = batch.get("box")
    if boxes is None:
        boxes = jnp.zeros((batch["text"].shape[0], 4), jnp.float32)
    tasks = locca.draw_tasks(weights.locca_tasks, boxes, _index(batch), seed=seed, step=step)
    tokens, targets = locca.task_sequences(batch["text"], boxes, tasks, layout)
    return {**batch, "task_tokens": tokens, "task_targets": targets}


def embed_and_caption_sum(model, batch, weights: CaptionWeights):
    """(image embeddings, text embeddings, the captioning cross-entropy summed over the batch's
    real target tokens) of a model with a decoder, the logits a slice of the vocabulary at a
    time with `loss.caption_vocab_chunk`."""
    sequences = (batch["task_tokens"], batch["task_targets"]) if "task_tokens" in batch else None
    a, b, losses = caption_token_losses(
        model, batch["image"], batch["text"], weights.label_smoothing, weights.vocab_chunk, sequences
    )
    return a, b, jnp.sum(losses)


def caption_weights(config) -> CaptionWeights | None:
    """How a model with a captioning decoder weighs its two losses; None without a decoder."""
    if config.model.decoder.variant == "none":
        return None
    loss = config.loss
    return CaptionWeights(
        float(loss.contrastive_weight),
        float(loss.caption_weight),
        float(loss.label_smoothing),
        int(loss.caption_vocab_chunk),
        tuple(float(w) for w in loss.locca_tasks),
    )


def _token_count(batch):
    # At least one, so a batch of empty captions gives a zero loss rather than 0 / 0.
    if "task_targets" in batch:
        return jnp.maximum(jnp.sum(batch["task_targets"]), 1.0)
    return jnp.maximum(caption_token_count(batch["text"]), 1.0)


def make_embed_fn(config, graphdef):
    """embed(params, batch, step) -> (a, b): the pair of embedding sets the loss compares.

    Image-image: both views are drawn on device from (seed, step, each example's `index`), so a
    resumed run, another mesh or another micro-batching sees the same views."""
    if config.task != "image_image":
        return lambda params, batch, step: nnx.merge(graphdef, params)(_images(batch), batch["text"])
    from clipjax.data.augment import augment_views

    def embed(params, batch, step):
        model = nnx.merge(graphdef, params)
        views = augment_views(
            batch["image"], _index(batch), seed=config.seed, step=step, config=config.augment
        )
        return tuple(model.project_image(v) for v in views)

    return embed


def _images(batch):
    """The image tower's input: the images, or a NaFlex batch's patches with their grids."""
    if "image_grid" in batch:
        return Patches(batch["image"], batch["image_grid"])
    return batch["image"]


def _index(batch):
    # Sources without a dataset position (a synthetic benchmark batch) count the batch's rows.
    if "index" in batch:
        return batch["index"]
    return jnp.arange(batch["image"].shape[0], dtype=jnp.int32)


def _item_ids(config, batch):
    """Equal ids mark the same item: the same caption (a true positive) in image-text mode; in
    image-image mode two views of one image share nothing with the other images but their
    position in the dataset."""
    if config.task == "image_image":
        return _index(batch)
    return batch.get("text_id", _index(batch))


def make_embedding_loss(config, mesh):
    """embedding_loss(a, b, logit_scale, logit_bias, batch, loss_state) -> (loss, new_loss_state)."""
    axes = batch_axes(mesh)
    intra = config.task == "image_image"

    def embedding_loss(a, b, logit_scale, logit_bias, batch, loss_state):
        index = _index(batch)
        return objective_loss(
            config.loss,
            a,
            b,
            logit_scale,
            logit_bias,
            ids=_item_ids(config, batch),
            labels=batch.get("label", index),
            index=index,
            loss_state=loss_state,
            mesh=mesh,
            batch_axes=axes,
            intra=intra,
        )

    return embedding_loss


def make_grad_fn(config, graphdef, mesh):
    """grad_fn(params, batch, loss_state=None, step=0, teacher=None) -> ((loss, (a, b,
    new_loss_state, parts)), grads) over the global batch: `contrastive_grad_fn`'s, plus SigLIP
    2's image-side losses where `image_losses` asks for them (`teacher`: the train state's)."""
    grad_fn = contrastive_grad_fn(config, graphdef, mesh)
    if not image_losses.active(config):
        return grad_fn
    return _with_image_losses(grad_fn, config, graphdef)


def _with_image_losses(grad_fn, config, graphdef):
    """grad_fn with the self-distillation and masked-prediction losses (clipjax/losses/
    image_losses.py) added from `image_losses.start` on: computed on the whole batch beside the
    contrastive loss, their gradients added to its. `parts` gains both (unweighted) and, under
    TEACHER_MEANS, the teacher's mean prototype scores that update its centres."""
    c = config.image_losses
    frozen_patterns = tuple(config.optim.frozen)
    start = image_losses.start_step(config, total_steps(config))

    def weighted(trainable, frozen, batch, step, teacher):
        params = optim.combine(trainable, frozen)
        student = nnx.merge(graphdef, params)
        ema = nnx.merge(graphdef, {**params, **{k: teacher[k] for k in TEACHER_PARTS}})
        distill, masked, means = image_losses.image_losses(
            student, ema, batch["image"], _index(batch), teacher["centers"], config=config, step=step
        )
        return c.self_distillation * distill + c.masked_prediction * masked, (distill, masked, means)

    def with_image_losses(params, batch, loss_state=None, step=0, teacher=None):
        (loss, (a, b, new_state, parts)), grads = grad_fn(params, batch, loss_state, step)
        trainable, frozen = optim.split_trainable(params, frozen_patterns)

        def on():
            (total, aux), g = jax.value_and_grad(weighted, has_aux=True)(
                trainable, frozen, batch, step, teacher
            )
            return total, aux, g

        def off():
            zero = jnp.zeros((), jnp.float32)
            means = jax.tree.map(jnp.zeros_like, teacher["centers"])
            return zero, (zero, zero, means), jax.tree.map(jnp.zeros_like, trainable)

        total, (distill, masked, means), g = jax.lax.cond(step >= start, on, off)
        parts = {
            **parts,
            "self_distillation_loss": distill,
            "masked_prediction_loss": masked,
            TEACHER_MEANS: means,
        }
        return (loss + total, (a, b, new_state, parts)), jax.tree.map(jnp.add, grads, g)

    return with_image_losses


# The key of `parts` that carries the teacher's mean prototype scores to the train step.
TEACHER_MEANS = "teacher_means"


def update_teacher(config, teacher, params, means, step, total: int):
    """The teacher after a step: the EMA of the image tower and heads, and (once the image-side
    losses are on) the running means of its prototype scores."""
    m = image_losses.teacher_momentum(config, step, total)
    out = {k: jax.tree.map(lambda t, p: m * t + (1.0 - m) * p, teacher[k], params[k]) for k in TEACHER_PARTS}
    cm = float(config.image_losses.center_momentum)
    on = step >= image_losses.start_step(config, total)
    out["centers"] = jax.tree.map(
        lambda c, new: jnp.where(on, cm * c + (1.0 - cm) * new, c), teacher["centers"], means
    )
    return out


def contrastive_grad_fn(config, graphdef, mesh):
    """grad_fn(params, batch, loss_state=None, step=0) -> ((loss, (a, b, new_loss_state)), grads)
    over the global batch.

    With `config.microbatches = k > 1` the towers see k micro-batches one at a time (GradCache):
    embed every micro-batch without gradients, take the loss gradient with respect to all B
    embeddings at once, then re-run each micro-batch under a VJP with its slice of that
    gradient, accumulating parameter gradients in a `lax.scan`. The loss sees the whole global
    batch, so the gradients are those of the un-split batch; activation memory is that of one
    micro-batch. The temperature and bias enter only the loss, so their gradient is taken once.

    With `config.optim.frozen` patterns, `grads` holds only the trainable parameters
    (`optim.split_trainable`): the frozen ones are closed over as constants, so the program has
    no backward pass for them at all (a frozen image tower runs forward only).
    """
    k = int(config.microbatches)
    frozen_patterns = tuple(config.optim.frozen)
    if k <= 1:
        loss_fn = make_loss_fn(config, graphdef, mesh)
        if not frozen_patterns:

            def full_grad_fn(params, batch, loss_state=None, step=0):
                return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, loss_state, step)

            return full_grad_fn

        def frozen_grad_fn(params, batch, loss_state=None, step=0):
            trainable, frozen = optim.split_trainable(params, frozen_patterns)
            return jax.value_and_grad(
                lambda t: loss_fn(optim.combine(t, frozen), batch, loss_state, step), has_aux=True
            )(trainable)

        return frozen_grad_fn
    axes = batch_axes(mesh)
    shards = batch_parallelism(mesh)
    embedding_loss = make_embedding_loss(config, mesh)
    embed_fn = make_embed_fn(config, graphdef)
    micro_sharding = NamedSharding(mesh, P(None, axes))
    rows_sharding = NamedSharding(mesh, P(axes))
    tower_inputs = ("image", "index") if config.task == "image_image" else ("image", "image_grid", "text")

    def split(x):
        # [B, ...] -> [k, B/k, ...] where every micro-batch takes b/k rows from each device's
        # block: a local reshuffle, and each micro-batch still spans the whole mesh.
        b = x.shape[0] // shards
        y = x.reshape(shards, k, b // k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y.reshape(k, shards * (b // k), *x.shape[1:]), micro_sharding)

    def merge(y):
        b = y.shape[0] * y.shape[1] // shards
        x = y.reshape(k, shards, b // k, *y.shape[2:]).swapaxes(0, 1).reshape(shards * b, *y.shape[2:])
        return jax.lax.with_sharding_constraint(x, rows_sharding)

    weights = caption_weights(config)
    # The contrastive objective's share of the loss: its gradient is scaled alike.
    contrastive_weight = 1.0 if weights is None else weights.contrastive

    def grad_fn(params, batch, loss_state=None, step=0):
        trainable, frozen = optim.split_trainable(params, frozen_patterns)
        batch = {**batch, "index": _index(batch)}
        if weights is not None:
            batch = with_task_sequences(nnx.merge(graphdef, params), batch, weights, config.seed, step)
        micro = {key: split(batch[key]) for key in tower_inputs + SEQUENCE_KEYS if key in batch}
        a, b = jax.lax.map(lambda mb: embed_fn(jax.lax.stop_gradient(params), mb, step), micro)
        a, b = merge(a), merge(b)
        has_bias = "logit_bias" in params
        bias = params["logit_bias"] if has_bias else jnp.zeros((), jnp.float32)

        def weighted_contrastive(i, t, s, c):
            loss, new_state = embedding_loss(i, t, s, c if has_bias else None, batch, loss_state or {})
            return contrastive_weight * loss, (new_state, loss)

        (weighted, (new_state, contrastive)), (g_a, g_b, g_scale, g_bias) = jax.value_and_grad(
            weighted_contrastive, argnums=(0, 1, 2, 3), has_aux=True
        )(a, b, params["logit_scale"], bias)
        # The captioning loss is a mean over the global batch's tokens: each micro-batch's sum
        # enters with the weight / the batch's count, so the sum of the micro-batches' gradients
        # is the un-split batch's.
        count = _token_count(batch) if weights is not None else None

        def accumulate(carry, xs):
            total, caption_sum = carry
            mb, ga, gb = xs
            if weights is None:
                _, vjp = jax.vjp(lambda t: embed_fn(optim.combine(t, frozen), mb, step), trainable)
                (g,) = vjp((ga, gb))
            else:
                (_, _, mb_sum), vjp = jax.vjp(
                    lambda t: embed_and_caption_sum(
                        nnx.merge(graphdef, optim.combine(t, frozen)), mb, weights
                    ),
                    trainable,
                )
                (g,) = vjp((ga, gb, weights.caption / count))
                caption_sum = caption_sum + mb_sum
            return (jax.tree.map(jnp.add, total, g), caption_sum), None

        (grads, caption_sum), _ = jax.lax.scan(
            accumulate,
            (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32)),
            (micro, split(g_a), split(g_b)),
        )
        if "logit_scale" in grads:
            grads["logit_scale"] = grads["logit_scale"] + g_scale
        if has_bias and "logit_bias" in grads:
            grads["logit_bias"] = grads["logit_bias"] + g_bias
        if weights is None:
            return (contrastive, (a, b, new_state, {})), grads
        caption = caption_sum / count
        loss = weighted + weights.caption * caption
        return (loss, (a, b, new_state, {"contrastive_loss": contrastive, "caption_loss": caption})), grads

    return grad_fn


def all_finite(tree) -> jax.Array:
    """One boolean: every element of every array in `tree` is finite. (Not the norm's finiteness:
    the sum of squares of large but finite parameters can overflow.)"""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _is_counter(path) -> bool:
    """The step counts inside optax states (`count` fields of Adam, schedules, ...)."""
    return bool(path) and getattr(path[-1], "name", getattr(path[-1], "key", None)) == "count"


# The batch keys the step reads (the rest of a data batch stays on the host). `index` (the
# example's position in the dataset) seeds image-image views and keys per-sample loss state;
# `box` (sources with object boxes) feeds LocCa's localisation tasks; `image_grid` is a NaFlex
# batch's (its `image` then holds patch sequences, one length per batch: one program each).
STEP_INPUTS = ("image", "image_grid", "text", "text_id", "label", "index", "box")


def make_train_step(config, mesh, graphdef, state_shardings, tx, schedule):
    """step(state, batch, with_metrics) -> (state, metrics); two compiled variants, by the flag."""
    axes = batch_axes(mesh)
    scale_max = float(config.model.logit_scale_max)
    grad_fn = make_grad_fn(config, graphdef, mesh)
    frozen_patterns = tuple(config.optim.frozen)
    total = total_steps(config)

    def train_step(state, batch, with_metrics):
        # Traced with the towers' activations pinned to the batch axes (the context is read
        # while jit traces this function, not when the compiled step runs).
        with activation_sharding(mesh, config.activation_rules):
            return sharded_train_step(state, batch, with_metrics)

    def sharded_train_step(state, batch, with_metrics):
        loss_state = state.get("loss_state", {})
        extra = {"teacher": state["teacher"]} if "teacher" in state else {}
        (loss, (img, txt, loss_state, parts)), grads = grad_fn(
            state["params"], batch, loss_state, state["step"], **extra
        )
        parts = dict(parts)
        teacher_means = parts.pop(TEACHER_MEANS, None)
        # Only the trainable parameters reach the optimizer; the frozen ones pass through as
        # they are (no update, no weight decay, no optimizer state), bit for bit.
        old, frozen = optim.split_trainable(state["params"], frozen_patterns)
        updates, opt_state = tx.update(grads, state["opt_state"], old)
        trainable = optax.apply_updates(old, updates)
        # CLIP clamps the learnable temperature after each step so logits never exceed 100x.
        if "logit_scale" in trainable:
            trainable["logit_scale"] = jnp.clip(trainable["logit_scale"], 0.0, scale_max)
        params = optim.combine(trainable, frozen)
        metrics = {
            "loss": loss,
            "logit_scale": jnp.exp(params["logit_scale"]),
            "temperature": jnp.exp(-params["logit_scale"]),
            "lr": schedule(state["step"]),
            "grad_norm": optax.tree.norm(grads),
        }
        if "logit_bias" in params:
            metrics["logit_bias"] = params["logit_bias"]
        metrics.update(parts)
        if with_metrics:
            # Measured on the embeddings this step trained on, with the temperature they saw.
            keys = {"": _item_ids(config, batch), "label_": batch["label"]}
            metrics.update(
                embedding_metrics(
                    img,
                    txt,
                    keys,
                    state["params"]["logit_scale"],
                    state["params"].get("logit_bias"),
                    mesh=mesh,
                    batch_axes=axes,
                )
            )
        # A non-finite loss or gradient leaves parameters and optimizer state as they were: one
        # bad batch must not poison the run. So does an update that makes the parameters
        # non-finite from finite gradients (a learning rate or decay that overflows): whatever
        # produced them, non-finite parameters are never kept, so never checkpointed. The
        # counters let the host stop a run of such steps.
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & all_finite(trainable)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = (~finite).astype(jnp.int32)
        metrics["nonfinite_skipped"] = state["nonfinite_total"] + skipped
        metrics["nonfinite_streak"] = jnp.where(finite, 0, state["nonfinite_streak"] + 1)
        new_state = {
            "step": state["step"] + 1,
            "params": optim.combine(keep(trainable, old), frozen),
            # ...except the step counters: one step count drives the schedule, the logs and the
            # checkpoints, so a skipped step still moves the learning rate along its curve.
            "opt_state": jax.tree_util.tree_map_with_path(
                lambda path, n, o: n if _is_counter(path) else jnp.where(finite, n, o),
                opt_state,
                state["opt_state"],
            ),
            "nonfinite_total": state["nonfinite_total"] + skipped,
            "nonfinite_streak": metrics["nonfinite_streak"],
        }
        if "loss_state" in state:  # per-sample estimates (SogCLR): kept as they were on a bad step
            new_state["loss_state"] = keep(loss_state, state["loss_state"])
        if "teacher" in state:  # the EMA teacher follows the parameters kept
            teacher = update_teacher(
                config, state["teacher"], new_state["params"], teacher_means, state["step"], total
            )
            new_state["teacher"] = keep(teacher, state["teacher"])
        metrics["param_norm"] = optax.tree.norm(new_state["params"])
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(axes))
    return jax.jit(
        train_step,
        static_argnums=(2,),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
