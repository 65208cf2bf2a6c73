"""Train a dual encoder: validate the config, build mesh, data, model and optimizer, run the loop.

    python -m clipjax.train --config configs/demo.py --workdir runs/demo [--config.steps=500]

A restart with the same --workdir resumes from the latest checkpoint, data iterator included.
At the end the held-out split is evaluated and written to <workdir>/report.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import config as config_lib
from clipjax import optim
from clipjax.checkpoint import Checkpointer, abstract_with_shardings
from clipjax.data import pipeline
from clipjax.evals.embed import embed_in_batches
from clipjax.evals.report import evaluate_embeddings, frozen_feature_metrics, summary_lines, write_report
from clipjax.logging import MetricWriter, Progress
from clipjax.losses import contrastive_loss
from clipjax.metrics import (
    COLLAPSE_DEFAULTS, CollapseAlarm, embedding_metrics, reference_embedding_metrics, split_spectra,
)
from clipjax.models.two_towers import build_model
from clipjax.parallel import batch_axes, batch_parallelism, host_batch_to_global, make_mesh, param_shardings
from clipjax.parallel.distributed import initialize_from_environment


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the first step."""
    config: Any
    mesh: jax.sharding.Mesh
    tokenizer: Any
    graphdef: Any
    state: dict                   # {'step', 'params', 'opt_state'}, sharded on the mesh
    state_shardings: dict
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int


def build_tokenizer(config):
    # Trained on the captions and the zero-shot prompts (evaluation tokenises the prompts too).
    return pipeline.make_dataset_tokenizer(config.data)


def _model_builder(config, tokenizer) -> Callable[[], nnx.Module]:
    return lambda: build_model(config.model, vocab_size=tokenizer.vocab_size,
                               max_len=config.data.tokenizer.max_len,
                               image_size=config.data.image_size, seed=config.seed)


def init_state(config, mesh, tokenizer):
    """Create parameters and optimizer state directly in their shardings (never whole on one device)."""
    make = _model_builder(config, tokenizer)
    abstract_model = nnx.eval_shape(make)
    graphdef, _ = nnx.split(abstract_model)
    p_shardings = param_shardings(abstract_model, mesh, config.sharding_rules)

    total = config_lib.total_steps(config)
    tx, schedule = optim.make_optimizer(config.optim, total, optim.weight_decay_mask(abstract_model))

    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make(), nnx.Param)), out_shardings=p_shardings)()
    abstract_opt = jax.eval_shape(tx.init, params)
    # Optimizer moments mirror the parameters, so they take the parameters' shardings; counters
    # and other small leaves are replicated.
    replicated = NamedSharding(mesh, P())
    opt_shardings = _opt_shardings(abstract_opt, params, p_shardings, replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    zero = lambda: jax.device_put(jnp.int32(0), replicated)
    state = {"step": zero(), "params": params, "opt_state": opt_state,
             "nonfinite_total": zero(), "nonfinite_streak": zero()}
    shardings = {"step": replicated, "params": p_shardings, "opt_state": opt_shardings,
                 "nonfinite_total": replicated, "nonfinite_streak": replicated}
    return Setup(config, mesh, tokenizer, graphdef, state, shardings, tx, schedule, total)


def _opt_shardings(abstract_opt, params, p_shardings, replicated):
    """Shard every sub-tree of the optimizer state that has the parameters' structure like them."""
    params_def = jax.tree.structure(params)

    def assign(node):
        if jax.tree.structure(node) == params_def:
            return p_shardings
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(assign, abstract_opt, is_leaf=lambda n: jax.tree.structure(n) == params_def)


def make_loss_fn(config, graphdef, mesh):
    """loss(params, batch) -> (loss, (img, txt)) over the global batch.

    The towers run under jit's automatic partitioning; the loss inside a shard_map.
    """
    embedding_loss = make_embedding_loss(config, mesh)

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        img, txt = model(batch["image"], batch["text"])
        return embedding_loss(img, txt, params["logit_scale"], params.get("logit_bias")), (img, txt)

    return loss_fn


def make_embedding_loss(config, mesh):
    axes = batch_axes(mesh)

    def embedding_loss(img, txt, logit_scale, logit_bias):
        return contrastive_loss(config.loss.name, img, txt, logit_scale, logit_bias, mesh=mesh,
                                batch_axes=axes, impl=config.loss.impl, chunk=config.loss.chunk or None)

    return embedding_loss


def make_grad_fn(config, graphdef, mesh):
    """grad_fn(params, batch) -> ((loss, (img, txt)), grads) over the global batch.

    With `config.microbatches = k > 1` the towers see k micro-batches one at a time (GradCache):
    embed every micro-batch without gradients, take the loss gradient with respect to all B
    embeddings at once, then re-run each micro-batch under a VJP with its slice of that
    gradient, accumulating parameter gradients in a `lax.scan`. The loss sees the whole global
    batch, so the gradients are those of the un-split batch; activation memory is that of one
    micro-batch. The temperature and bias enter only the loss, so their gradient is taken once.
    """
    k = int(config.microbatches)
    if k <= 1:
        return jax.value_and_grad(make_loss_fn(config, graphdef, mesh), has_aux=True)
    axes = batch_axes(mesh)
    shards = batch_parallelism(mesh)
    embedding_loss = make_embedding_loss(config, mesh)
    micro_sharding = NamedSharding(mesh, P(None, axes))
    rows_sharding = NamedSharding(mesh, P(axes))

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

    def embed(params, micro):
        return nnx.merge(graphdef, params)(micro["image"], micro["text"])

    def grad_fn(params, batch):
        micro = {key: split(batch[key]) for key in ("image", "text")}
        img, txt = jax.lax.map(lambda mb: embed(jax.lax.stop_gradient(params), mb), micro)
        img, txt = merge(img), merge(txt)
        has_bias = "logit_bias" in params
        bias = params["logit_bias"] if has_bias else jnp.zeros((), jnp.float32)
        loss, (g_img, g_txt, g_scale, g_bias) = jax.value_and_grad(
            lambda i, t, s, c: embedding_loss(i, t, s, c if has_bias else None), argnums=(0, 1, 2, 3)
        )(img, txt, params["logit_scale"], bias)

        def accumulate(total, xs):
            mb, gi, gt = xs
            _, vjp = jax.vjp(lambda p: embed(p, mb), params)
            (g,) = vjp((gi, gt))
            return jax.tree.map(jnp.add, total, g), None

        grads, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params),
                                (micro, split(g_img), split(g_txt)))
        grads["logit_scale"] = grads["logit_scale"] + g_scale
        if has_bias:
            grads["logit_bias"] = grads["logit_bias"] + g_bias
        return (loss, (img, txt)), grads

    return grad_fn


STEP_INPUTS = ("image", "text", "text_id", "label")
COLLAPSE_KEYS = tuple(COLLAPSE_DEFAULTS)


def make_train_step(setup: Setup):
    """step(state, batch, with_metrics) -> (state, metrics); two compiled variants, by the flag."""
    config, mesh, tx, schedule = setup.config, setup.mesh, setup.tx, setup.schedule
    axes = batch_axes(mesh)
    scale_max = float(config.model.logit_scale_max)
    grad_fn = make_grad_fn(config, setup.graphdef, mesh)

    def train_step(state, batch, with_metrics):
        (loss, (img, txt)), grads = grad_fn(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # CLIP clamps the learnable temperature after each step so logits never exceed 100x.
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, scale_max)
        metrics = {
            "loss": loss,
            "logit_scale": jnp.exp(params["logit_scale"]),
            "temperature": jnp.exp(-params["logit_scale"]),
            "lr": schedule(state["step"]),
            "grad_norm": optax.tree.norm(grads),
        }
        if "logit_bias" in params:
            metrics["logit_bias"] = params["logit_bias"]
        if with_metrics:
            # Measured on the embeddings this step trained on, with the temperature they saw.
            keys = {"": batch["text_id"], "label_": batch["label"]}
            metrics.update(embedding_metrics(img, txt, keys, state["params"]["logit_scale"],
                                             state["params"].get("logit_bias"), mesh=mesh, batch_axes=axes))
        # A non-finite loss or gradient leaves parameters and optimizer state as they were: one
        # bad batch must not poison the run. The counters let the host stop a run of them.
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = (~finite).astype(jnp.int32)
        metrics["nonfinite_skipped"] = state["nonfinite_total"] + skipped
        metrics["nonfinite_streak"] = jnp.where(finite, 0, state["nonfinite_streak"] + 1)
        new_state = {
            "step": state["step"] + 1,
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "nonfinite_total": state["nonfinite_total"] + skipped,
            "nonfinite_streak": metrics["nonfinite_streak"],
        }
        metrics["param_norm"] = optax.tree.norm(new_state["params"])
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(axes))
    return jax.jit(
        train_step,
        static_argnums=(2,),
        in_shardings=(setup.state_shardings, batch_sharding),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=(0,),
    )


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class PreemptionWatch:
    """Turns SIGTERM into a request to checkpoint and stop at the end of the current step.

    Every process must stop at the same step (a checkpoint is a collective), so with several
    processes the request is agreed on with a tiny all-gather each step.
    """

    def __enter__(self):
        self._flag = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        flags = multihost_utils.process_allgather(np.array([self._flag], np.int32))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def data_drop_metrics(iterator) -> dict[str, int]:
    """Records the input pipeline skipped as undecodable so far, in total and by reason."""
    counts = dict(getattr(iterator, "drop_counts", {}) or {})
    return {"data_dropped": int(sum(counts.values())),
            **{f"data_dropped/{reason}": int(n) for reason, n in sorted(counts.items())}}


def flatten_report(report: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a report as 'prefix/a/b/c' scalars (for metrics.jsonl and TensorBoard)."""
    out = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(flatten_report(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[f"{prefix}{key}"] = value
    return out


def alarm_start_step(config, total_steps: int) -> int:
    if config.metrics.alarm_start_step >= 0:
        return int(config.metrics.alarm_start_step)
    warmup = optim.warmup_steps(config.optim, total_steps)
    return max(2 * warmup, total_steps // 10)


@functools.lru_cache(maxsize=8)
def make_encoders(graphdef, mesh):
    """Jitted image and text encoders that take the parameters explicitly.

    Cached per (model structure, mesh): evaluation every `evals.every` steps reuses the
    compiled encoders instead of tracing new ones each time.
    """
    rows = NamedSharding(mesh, P(batch_axes(mesh)))
    encode_image = jax.jit(lambda params, x: nnx.merge(graphdef, params).encode_image(x), out_shardings=rows)
    encode_text = jax.jit(lambda params, t: nnx.merge(graphdef, params).encode_text(t), out_shardings=rows)
    return encode_image, encode_text


def run_evaluation(config, mesh, tokenizer, graphdef, params, step: int) -> dict:
    arrays = pipeline.load_split_arrays(config.data, tokenizer, split="test",
                                        max_examples=config.evals.max_examples)
    encode_image, encode_text = make_encoders(graphdef, mesh)
    batch = config.evals.batch_size
    image_emb = embed_in_batches(lambda x: encode_image(params, x), arrays["image"], mesh=mesh, batch_size=batch)
    text_emb = embed_in_batches(lambda t: encode_text(params, t), arrays["text"], mesh=mesh, batch_size=batch)

    def encode_texts(strings):
        return embed_in_batches(lambda t: encode_text(params, t), tokenizer.encode(list(strings)),
                                mesh=mesh, batch_size=batch)

    report = evaluate_embeddings(image_emb=image_emb, text_emb=text_emb, arrays=arrays,
                                 encode_texts=encode_texts, zero_shot_tasks=pipeline.zero_shot_tasks(config.data),
                                 evals_config=config.evals)
    if (config.evals.linear_probe or config.evals.knn) and np.all(arrays["label"] >= 0):
        train = pipeline.load_split_arrays(config.data, tokenizer, split="train",
                                           max_examples=config.evals.probe_train_examples)
        train_emb = embed_in_batches(lambda x: encode_image(params, x), train["image"], mesh=mesh, batch_size=batch)
        report.update(frozen_feature_metrics(train_features=train_emb, train_labels=train["label"],
                                             test_features=image_emb, test_labels=arrays["label"],
                                             evals_config=config.evals))
    if config.evals.classification:
        report["classification"] = {config.evals.classification: classification_metrics(
            config, mesh, encode_image, encode_texts, params)}
    # The spectrum of a fixed held-out probe set, comparable across checkpoints and runs.
    scalars, spectra = split_spectra(jax.device_get(reference_embedding_metrics(
        image_emb, text_emb, arrays["text_id"], params["logit_scale"], params.get("logit_bias"))))
    report["embedding"] = {**scalars, **{k: v.tolist() for k, v in spectra.items()}}
    return {"step": int(step), **report}


def classification_metrics(config, mesh, encode_image, encode_texts, params) -> dict:
    """Zero-shot, linear probe and kNN on a tfds image-classification dataset (evals.classification)."""
    from clipjax.data import classification
    from clipjax.evals.zero_shot import class_embeddings, zero_shot_accuracy

    name = config.evals.classification
    data_dir = config.evals.classification_data_dir or config.data.data_dir
    size, batch = config.data.image_size, config.evals.batch_size
    test = classification.load_classification_split(name, data_dir, "test", size, max_examples=config.evals.max_examples)
    test_emb = embed_in_batches(lambda x: encode_image(params, x), test["image"], mesh=mesh, batch_size=batch)
    names, templates = classification.zero_shot_task(name, data_dir)
    result = {"num_examples": int(len(test_emb)),
              "zero_shot": zero_shot_accuracy(test_emb, class_embeddings(encode_texts, names, templates), test["label"])}
    if config.evals.linear_probe or config.evals.knn:
        train = classification.load_classification_split(name, data_dir, "train", size,
                                                         max_examples=config.evals.probe_train_examples)
        train_emb = embed_in_batches(lambda x: encode_image(params, x), train["image"], mesh=mesh, batch_size=batch)
        result.update(frozen_feature_metrics(train_features=train_emb, train_labels=train["label"],
                                             test_features=test_emb, test_labels=test["label"],
                                             evals_config=config.evals))
    return result


def train(config, workdir: str, *, stop_at: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Train (resuming if workdir has a checkpoint), evaluate, and return the final report.

    `stop_at` ends this run early after that many total steps, with a checkpoint and no
    evaluation, as a preemption would; the learning-rate schedule still follows `config.steps`.
    """
    t_start = time.perf_counter()
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)

    mesh = make_mesh(config.mesh)
    pipeline.prepare(config.data)
    tokenizer = build_tokenizer(config)
    setup = init_state(config, mesh, tokenizer)
    iterator = pipeline.make_train_iterator(
        config.data, tokenizer, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())

    checkpointer = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    state = setup.state
    restored = checkpointer.restore_latest(abstract_with_shardings(state, setup.state_shardings), log=log)
    step = 0
    if restored is not None:
        step, state, data_state = restored
        if data_state is not None:
            iterator.set_state(data_state)
        log(f"resumed from {checkpointer.directory} at step {step}")

    train_step = make_train_step(setup)
    writer = MetricWriter(workdir, enabled=lead)
    progress = Progress(setup.total_steps, enabled=lead)
    t_prepared = time.perf_counter()
    log(f"mesh {dict(mesh.shape)}, {jax.device_count()} devices, {jax.process_count()} processes; "
        f"{sum(x.size for x in jax.tree.leaves(state['params'])):,} parameters; "
        f"set-up {t_prepared - t_start:.1f} s")

    alarm = CollapseAlarm(dim=config.model.embed_dim, batch_size=config.data.batch_size,
                          **{k: config.metrics[k] for k in COLLAPSE_KEYS})
    alarm_start = alarm_start_step(config, setup.total_steps)
    window_start, window_steps = time.perf_counter(), 0
    global_batch = config.data.batch_size
    last_step = setup.total_steps if stop_at is None else min(stop_at, setup.total_steps)
    stop_reason = None
    with PreemptionWatch() as preemption:
        while step < last_step and stop_reason is None:
            batch = host_batch_to_global(next(iterator), mesh)
            with_metrics = bool(config.metrics.every) and (step + 1) % config.metrics.every == 0
            state, metrics = train_step(state, {k: batch[k] for k in STEP_INPUTS}, with_metrics)
            step += 1
            window_steps += 1
            due_checkpoint = step % config.checkpoint_every == 0 or step == last_step
            if with_metrics or due_checkpoint or step % config.log_every == 0 or step == 1:
                metrics, spectra = split_spectra(jax.device_get(metrics))
                elapsed = time.perf_counter() - window_start
                metrics["samples_per_sec"] = window_steps * global_batch / max(elapsed, 1e-9)
                metrics.update(data_drop_metrics(iterator))
                if with_metrics and step >= alarm_start:
                    for line in alarm.update(step, metrics):
                        log(f"WARNING: {line}")
                    if config.metrics.halt_on_collapse and alarm.fired:
                        stop_reason = (f"embedding collapse ({', '.join(sorted(alarm.fired))}); "
                                       f"metrics.halt_on_collapse is set")
                if with_metrics:
                    metrics["collapse_alarm"] = int(bool(alarm.fired))
                    writer.write_spectra(step, spectra, metrics)
                writer.write(step, metrics)
                progress.update(step, float(metrics["loss"]), metrics["samples_per_sec"])
                window_start, window_steps = time.perf_counter(), 0
                # Checked where metrics are fetched anyway (no per-step sync); skipped steps
                # leave the state untouched, so stopping a few steps late loses nothing.
                streak = int(metrics["nonfinite_streak"])
                if streak >= config.max_nonfinite_streak > 0:
                    stop_reason = (f"{streak} consecutive steps had a non-finite loss or gradient "
                                   f"(max_nonfinite_streak={config.max_nonfinite_streak}); the last "
                                   f"good state is checkpointed")
            if preemption.requested():
                stop_reason = "SIGTERM received (preemption)"
            if due_checkpoint or stop_reason:
                checkpointer.save(step, state, iterator.get_state())
            if config.evals.every and step % config.evals.every == 0 and step < setup.total_steps:
                # The same evaluators as the end-of-run report, on the same held-out examples.
                interim = run_evaluation(config, mesh, tokenizer, setup.graphdef, state["params"], step)
                writer.write(step, flatten_report(interim, prefix="eval/"))
                for line in summary_lines(interim):
                    log(line)
    if stop_reason:
        log(f"stopped at step {step}: {stop_reason}")
    writer.plot_spectra()
    checkpointer.wait()
    t_trained = time.perf_counter()

    report = {}
    if config.evals.at_end and step == setup.total_steps and stop_reason is None:
        report = run_evaluation(config, mesh, tokenizer, setup.graphdef, state["params"], step)
        report["timing"] = {"setup_s": t_prepared - t_start, "train_s": t_trained - t_prepared,
                            "eval_s": time.perf_counter() - t_trained}
        if lead:
            write_report(report, os.path.join(workdir, "report.json"))
            for line in summary_lines(report):
                log(line)
    checkpointer.close()
    writer.close()
    if stop_reason and "non-finite" in stop_reason:
        raise NonFiniteError(f"stopped at step {step}: {stop_reason}")
    return report


def main(argv):
    del argv
    from absl import flags, logging as absl_logging
    # Orbax and tfds log every checkpoint operation at INFO; keep the console to our own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    initialize_from_environment()
    lead = jax.process_index() == 0
    train(flags.FLAGS.config, flags.FLAGS.workdir, log=print if lead else (lambda _: None))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A configs/*.py file (optionally file.py:arg).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and report.json go.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
