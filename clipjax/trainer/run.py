"""`train(config, workdir)`: build everything from the config, run the loop, evaluate."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax

from clipjax import optim
from clipjax.checkpoint import Checkpointer, abstract_with_shardings
from clipjax.config import total_steps, validate
from clipjax.data.sources import make_source
from clipjax.evals.report import summary_lines, write_report
from clipjax.evals.runner import EvalRunner
from clipjax.metric_writer import MetricWriter, Progress
from clipjax.metrics import ALARM_FIELDS, CollapseAlarm
from clipjax.parallel import host_batch_to_global, make_mesh
from clipjax.trainer import hooks
from clipjax.trainer.loop import Trainer
from clipjax.trainer.state import init_train_state
from clipjax.trainer.step import STEP_INPUTS, make_train_step


def alarm_start_step(config, total: int) -> int:
    if config.metrics.alarm_start_step >= 0:
        return int(config.metrics.alarm_start_step)
    warmup = optim.warmup_steps(config.optim, total)
    return max(2 * warmup, total // 10)


def _global_batches(iterator, mesh):
    # Only `next()` is part of the data-source contract (see pipeline.TrainIterator).
    while True:
        batch = next(iterator)
        yield host_batch_to_global({k: batch[k] for k in STEP_INPUTS}, mesh)


def train(config, workdir: str, *, stop_at: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Train (resuming if workdir has a checkpoint), evaluate, and return the final report.

    `stop_at` ends this run early after that many total steps, with a checkpoint and no
    evaluation, as a preemption would; the learning-rate schedule still follows `config.steps`.
    """
    t_start = time.perf_counter()
    validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)

    mesh = make_mesh(config.mesh)
    source = make_source(config.data)
    source.prepare()
    tokenizer = source.tokenizer()
    total = total_steps(config)
    initial = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    graphdef, state, shardings = initial.graphdef, initial.state, initial.shardings
    iterator = source.train_iterator(
        tokenizer, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count()
    )

    checkpointer = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    restored = checkpointer.restore_latest(abstract_with_shardings(state, shardings), log=log)
    step = 0
    if restored is not None:
        step, state, data_state = restored
        if data_state is not None:
            iterator.set_state(data_state)
        log(f"resumed from {checkpointer.directory} at step {step}")

    train_step = make_train_step(config, mesh, graphdef, shardings, initial.tx, initial.schedule)
    writer = MetricWriter(workdir, enabled=lead)
    progress = Progress(total, enabled=lead)
    evaluation = EvalRunner(config, source, tokenizer)
    t_prepared = time.perf_counter()
    log(
        f"mesh {dict(mesh.shape)}, {jax.device_count()} devices, {jax.process_count()} processes; "
        f"{sum(x.size for x in jax.tree.leaves(state['params'])):,} parameters; "
        f"set-up {t_prepared - t_start:.1f} s"
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
    # Order matters: the hooks that may stop the run come before the checkpoint.
    trainer.add_hook(
        hooks.LogHook(
            writer, progress, global_batch=config.data.batch_size, data_iterator=iterator, start_step=step
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
    with hooks.PreemptionWatch() as preemption:
        trainer.add_hook(preemption, every=1)
        trainer.add_hook(
            hooks.checkpoint_hook(checkpointer, iterator), every=config.checkpoint_every, at_stop=True
        )
        trainer.add_hook(
            hooks.eval_hook(evaluation, writer, graphdef=graphdef, mesh=mesh, total_steps=total, log=log),
            every=config.evals.every,
        )
        # Last: one metrics.jsonl record per step, written as soon as the step's hooks are done.
        trainer.add_hook(lambda info: writer.flush(), every=1)
        state = trainer.run()
    step, stop_reason = trainer.step, trainer.stop_reason
    if stop_reason:
        log(f"stopped at step {step}: {stop_reason}")
    writer.plot_spectra()
    checkpointer.wait()
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
            write_report(report, os.path.join(workdir, "report.json"))
            for line in summary_lines(report):
                log(line)
    checkpointer.close()
    writer.close()
    if stop_reason and "non-finite" in stop_reason:
        raise hooks.NonFiniteError(f"stopped at step {step}: {stop_reason}")
    return report
