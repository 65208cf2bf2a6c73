"""`train(config, workdir)`: build everything from the config, run the loop, evaluate.

Before anything is built, the workdir is locked (one trainer per workdir) and, when it already
holds checkpoints, the config is checked against the run they belong to; the run store
(`clipjax.run_store.start`) decides where the state starts: the run's checkpoint, `init_from`, or
fresh. Whatever goes wrong in the loop, the save in progress is finished (or fails with its
reason) and the lock is released before the error propagates.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import jax

from clipjax import flops, optim, paths
from clipjax.checkpoint import Checkpointer
from clipjax.config import total_steps, validate
from clipjax.data.naflex import NaflexInputs, seq_len_at
from clipjax.data.sources import make_source
from clipjax.evals.report import summary_lines, write_report
from clipjax.evals.runner import EvalRunner
from clipjax.losses import image_losses
from clipjax.metric_writer import MetricWriter, Progress
from clipjax.metrics import ALARM_FIELDS, CollapseAlarm
from clipjax.models.spec import config_model_spec, naflex_seq_lens
from clipjax.parallel import host_batch_to_global, make_mesh
from clipjax.run_store import layout
from clipjax.run_store.record import checkpoint_meta, resolve_paths, write_config
from clipjax.run_store.start import open_run
from clipjax.trainer import hooks
from clipjax.trainer.loop import Trainer
from clipjax.trainer.state import init_train_state
from clipjax.trainer.step import STEP_INPUTS, make_train_step
from clipjax.workdir_lock import WorkdirLock


def alarm_start_step(config, total: int) -> int:
    if config.metrics.alarm_start_step >= 0:
        return int(config.metrics.alarm_start_step)
    warmup = optim.warmup_steps(config.optim, total)
    return max(2 * warmup, total // 10)


def naflex_inputs(config, first_batch: int) -> NaflexInputs | None:
    """What a NaFlex model's data pipeline needs (None for any other model): each batch's
    sequence length drawn from (seed, step), the iterator's first batch being step `first_batch`."""
    lens = naflex_seq_lens(config)
    if not lens:
        return None
    return NaflexInputs(config_model_spec(config).image.patch_size, lens, int(config.seed), int(first_batch))


def _global_batches(iterator, mesh):
    # Only `next()` is part of the data-source contract (see pipeline.TrainIterator).
    while True:
        batch = next(iterator)
        yield host_batch_to_global({k: batch[k] for k in STEP_INPUTS if k in batch}, mesh)


def train(config, workdir: str, *, stop_at: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Train (resuming if workdir has a checkpoint), evaluate, and return the final report.

    `stop_at` ends this run early after that many total steps, with a checkpoint and no
    evaluation, as a preemption would; the learning-rate schedule still follows `config.steps`.
    """
    validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    config = resolve_paths(config)
    lead = jax.process_index() == 0
    paths.makedirs(workdir)
    with contextlib.ExitStack() as cleanup:
        if lead:
            lock = WorkdirLock(workdir)
            lock.acquire(log=log)
            cleanup.callback(lock.release)
        return _train(config, workdir, stop_at=stop_at, log=log, lead=lead, cleanup=cleanup)


def _train(config, workdir, *, stop_at, log, lead, cleanup: contextlib.ExitStack) -> dict:
    t_start = time.perf_counter()
    checkpointer = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    cleanup.callback(checkpointer.close)
    run = open_run(config, workdir, checkpointer, log=log)  # a refused config stops here
    mesh = make_mesh(config.mesh)
    source = make_source(config.data)
    source.prepare()
    # Before anything is sized by it (steps of `epochs`, the loss state) or compiled.
    config.data.num_train = source.settle_num_train(run.num_train)
    tokenizer = run.tokenizer(config, source, log=log)
    total = total_steps(config)
    # A resume needs only the state's shapes and shardings to restore into: building fresh weights
    # first would cost a model's memory and an initialisation, only to overwrite them.
    initial = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size, abstract=run.resumes)
    graphdef, shardings = initial.graphdef, initial.shardings
    step, state, data_state, data_offset, examples = run.initial_state(
        config, initial.state, shardings, mesh, tokenizer, log=log
    )
    if lead:  # only now: a refused or failed start leaves the previous run's config.json as it was
        write_config(workdir, config)
    naflex = naflex_inputs(config, step)
    iterator = source.train_iterator(
        tokenizer,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_example=data_offset,
        **({} if naflex is None else {"naflex": naflex}),
    )
    # Worker processes stop, and hand back their shared memory, however the run ends.
    cleanup.callback(getattr(iterator, "close", lambda: None))
    if data_state is not None:
        iterator.set_state(data_state)

    train_step = make_train_step(config, mesh, graphdef, shardings, initial.tx, initial.schedule)
    writer = MetricWriter(workdir, enabled=lead, config=config)
    # Told whether the run is ending in an error, so that W&B does not show a crash as finished
    # (a run stopped by a signal is not one: it resumes).
    cleanup.push(
        lambda exc_type, *_: writer.close(
            failed=exc_type is not None and not issubclass(exc_type, hooks.StoppedEarly)
        )
    )
    progress = Progress(total, enabled=lead)
    evaluation = EvalRunner(config, source, tokenizer, log=log)
    t_prepared = time.perf_counter()
    step_flops = flops.train_flops_per_step(config, tokenizer.vocab_size)
    flops_at = step_flops
    if image_losses.active(config):  # more FLOPs per step once the image-side losses are on
        before = flops.train_flops_per_step(config, tokenizer.vocab_size, image_losses_on=False)
        on = image_losses.start_step(config, total)
        flops_at = lambda s: step_flops if s >= on else before  # noqa: E731
    if naflex is not None:  # each step at its batch's sequence length (the log line: the longest)
        by_length = {
            n: flops.train_flops_per_step(config, tokenizer.vocab_size, image_seq_len=n)
            for n in naflex.seq_lens
        }
        flops_at = lambda s: by_length[seq_len_at(naflex, s)]  # noqa: E731
    trainable = ""
    if config.optim.frozen:
        params = optim.split_trainable(state["params"], config.optim.frozen)[0]
        trainable = f" ({sum(x.size for x in jax.tree.leaves(params)):,} trainable)"
    log(
        f"mesh {dict(mesh.shape)}, {jax.device_count()} devices, {jax.process_count()} processes; "
        f"{sum(x.size for x in jax.tree.leaves(state['params'])):,} parameters{trainable}; "
        f"{flops.forward_flops_per_example(config, tokenizer.vocab_size) / 1e9:.4g} GFLOP per example forward, "
        f"{step_flops / 1e12:.4g} TFLOP per train step; set-up {t_prepared - t_start:.1f} s"
    )

    last_step = total if stop_at is None else min(stop_at, total)
    trainer = Trainer(
        train_step,
        state,
        _global_batches(iterator, mesh),
        start_step=step,
        last_step=last_step,
        metrics_every=config.metrics.every,
    )
    alarm = CollapseAlarm(
        dim=config.model.embed_dim,
        batch_size=config.data.batch_size,
        **{k: config.metrics[k] for k in ALARM_FIELDS},
    )
    step_base, examples_base = step, examples

    def meta_at(step: int) -> dict:
        seen = examples_base + (step - step_base) * config.data.batch_size
        return checkpoint_meta(config, tokenizer, examples_seen=seen, data_offset=data_offset)

    # Order matters: the hooks that may stop the run come before the checkpoint.
    trainer.add_hook(
        hooks.LogHook(
            writer,
            progress,
            global_batch=config.data.batch_size,
            data_iterator=iterator,
            start_step=step,
            flops_per_step=flops_at,
            peak_flops=flops.peak_flops_per_device(jax.devices()[0].device_kind, config.peak_tflops),
            num_devices=mesh.size,
        ),
        every=config.log_every,
        at_stop=True,
    )
    trainer.add_hook(
        hooks.EmbeddingMetricsHook(
            writer,
            alarm,
            start_step=alarm_start_step(config, total),
            halt=config.metrics.halt_on_collapse,
            log=log,
        ),
        every=config.metrics.every,
    )
    trainer.add_hook(hooks.nonfinite_hook(config.max_nonfinite_streak), every=config.log_every, at_stop=True)
    if config.profile.start_step > 0 and lead:
        profiler = hooks.ProfileHook(
            workdir, start=config.profile.start_step, steps=config.profile.steps, log=log
        )
        cleanup.callback(profiler.close)
        trainer.add_hook(profiler, every=1)
    with hooks.PreemptionWatch() as preemption:
        trainer.add_hook(preemption, every=1)
        trainer.add_hook(
            hooks.checkpoint_hook(checkpointer, iterator, meta_at),
            every=config.checkpoint_every,
            at_stop=True,
        )
        trainer.add_hook(
            hooks.eval_hook(evaluation, writer, graphdef=graphdef, mesh=mesh, total_steps=total, log=log),
            every=1 if evaluation.periodic else 0,  # each evaluator's own cadence: EvalRunner.due
        )
        # Last: one metrics.jsonl record per step, written as soon as the step's hooks are done.
        trainer.add_hook(lambda info: writer.flush(), every=1)
        try:
            state = trainer.run()
        except BaseException:
            # The real error propagates; first the save in progress is finished (or its own
            # failure is dropped in favour of the original error), leaving no partial state.
            with contextlib.suppress(Exception):
                checkpointer.wait()
            raise
    step, stop_reason = trainer.step, trainer.stop_reason
    asked_to_stop = stop_reason is not None and stop_reason == preemption.received
    if stop_reason and not asked_to_stop:
        log(f"stopped at step {step}: {stop_reason}")
    writer.plot_spectra()
    checkpointer.wait()
    if asked_to_stop:
        # Unfinished, not failed: its own exit status, so that a wrapper retries it.
        raise hooks.StoppedEarly(
            f"stopped at step {step} of {total}: {stop_reason}; saved, run the same command to resume"
        )
    t_trained = time.perf_counter()

    report = {}
    if config.evals.at_end and step == total and stop_reason is None:
        report = evaluation.run(graphdef, state["params"], mesh, step)
        report["timing"] = {
            "setup_s": t_prepared - t_start,
            "train_s": t_trained - t_prepared,
            "eval_s": time.perf_counter() - t_trained,
        }
        if lead:
            write_report(report, paths.join(workdir, layout.REPORT))
            for line in summary_lines(report):
                log(line)
    if stop_reason and "non-finite" in stop_reason:
        raise hooks.NonFiniteError(f"stopped at step {step}: {stop_reason}")
    return report
