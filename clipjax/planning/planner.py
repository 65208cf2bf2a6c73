"""A config and a topology in, a `Plan` out; and the largest global batch that fits."""

from __future__ import annotations

import copy
import dataclasses
import math

from clipjax.config import ConfigError, validate
from clipjax.flops import train_flops_per_step
from clipjax.parallel import batch_parallelism
from clipjax.planning.compile import (
    compile_embed_steps,
    compile_train_steps,
    plan_mesh,
    planned_vocab_size,
    topology_devices,
)
from clipjax.planning.report import IMAGES_PER_CORE, Plan, Probe, find_batch


def build_plan(
    config,
    topology: str,
    *,
    config_name: str = "",
    vocab_size: int = 0,
    embed: bool = True,
    images_per_core: float = IMAGES_PER_CORE,
    log=lambda _: None,
) -> Plan:
    """Compile the run's train step, metrics step and (with `embed`) evaluation encoders for
    `topology` and collect what `render` prints. The config is checked first, as `train` does."""
    chip, devices = topology_devices(topology)
    validate(config, num_devices=len(devices), check_data=False)
    mesh = plan_mesh(config, devices)
    vocab = planned_vocab_size(config, vocab_size)
    log(f"compiling the train and metrics steps for {topology} ({len(devices)} chips)...")
    train = compile_train_steps(config, mesh, vocab_size=vocab)
    steps = {"train": train[False], "metrics": train[True]}
    if embed:
        log("compiling the evaluation encoders...")
        for name, step in compile_embed_steps(config, devices, vocab_size=vocab).items():
            steps[f"embed {name}s"] = step
    return Plan(
        config_name=config_name,
        topology=topology,
        chip=chip,
        chips=len(devices),
        mesh=dict(mesh.shape),
        batch_size=int(config.data.batch_size),
        steps=steps,
        model_flops_per_step=train_flops_per_step(config, vocab),
        images_per_core=images_per_core,
    )


def _granule(config, micro_per_chip: int = 0) -> int:
    """Per-shard batches must be multiples of the micro-batch count (or, with a fixed micro-batch
    size, of that size) and of a set loss chunk."""
    parts = [int(micro_per_chip) if micro_per_chip else int(config.microbatches)]
    if config.loss.impl == "ring" and config.loss.chunk:
        parts.append(int(config.loss.chunk))
    return math.lcm(*parts)


def largest_batch(
    config,
    topology: str,
    *,
    vocab_size: int = 0,
    resolution: int = 8,
    micro_per_chip: int = 0,
    probes: dict | None = None,
    log=print,
) -> int:
    """The largest global batch whose train step *and* metrics step fit each chip's HBM, for the
    config as given: doubling from the config's batch, then bisection down to 1/`resolution` of
    the answer (a per-shard multiple of `_granule`). With `micro_per_chip`, every trial batch
    runs as micro-batches of that many examples per chip (`microbatches` = per-chip batch / it):
    the towers then hold one micro-batch, and the loss's memory is what grows. `probes` (per-shard
    batch -> {"fits", "fill"}, or a bool as stored before fills were kept), when given, is read
    before compiling and filled after: a search stopped part-way resumes from the probes it had
    done."""
    chip, devices = topology_devices(topology)
    mesh = plan_mesh(config, devices)
    ways = batch_parallelism(mesh)
    vocab = planned_vocab_size(config, vocab_size)
    granule = _granule(config, micro_per_chip)
    start = max(granule, int(config.data.batch_size) // ways // granule * granule)

    def trial_config(per_shard: int):
        trial = copy.deepcopy(config)
        trial.data.batch_size = per_shard * ways
        if micro_per_chip:
            trial.microbatches = per_shard // micro_per_chip
        return trial

    validate(trial_config(start), num_devices=len(devices), check_data=False)

    probes = {} if probes is None else probes

    def fits(per_shard: int) -> Probe:
        probe = compiled_fits(per_shard)
        probes[str(per_shard)] = dataclasses.asdict(probe)
        return probe

    def compiled_fits(per_shard: int) -> Probe:
        trial = trial_config(per_shard)
        try:
            validate(trial, num_devices=len(devices), check_data=False)
        except ConfigError:
            return Probe(False)
        # The cheaper train step first: a batch that fails it needs no metrics compile. The fill
        # (memory asked / HBM, the larger step's) lets the search aim at the boundary.
        fill = 0.0
        for flag in (False, True):
            step = compile_train_steps(trial, mesh, vocab_size=vocab, metrics=(flag,))[flag]
            fill = max(fill, (step.memory.total if step.fits else step.required_bytes) / chip.hbm_bytes)
            if not step.fits or step.memory.total > chip.hbm_bytes:
                return Probe(False, round(fill, 6) if fill else None)
        return Probe(True, round(fill, 6))

    per_shard = find_batch(
        fits,
        start=start,
        granule=granule,
        resolution=resolution,
        known={int(b): p for b, p in probes.items()},
        log=log,
    )
    return per_shard * ways
