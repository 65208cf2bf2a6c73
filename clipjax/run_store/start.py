"""Where a training run starts: the workdir's own newest checkpoint (a resume), else the weights of
`config.init_from` (a new run from an old one's parameters, whole or by tower), else the fresh
state the trainer built.

`open_run` reads and checks the workdir's run before the data is read or the model built, so a
refused config costs nothing; `Run.tokenizer` then chooses the token ids (the checkpoint's, the
old run's for `init_from`, else the data's) and `Run.initial_state` the state.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.experimental import multihost_utils

from clipjax import paths
from clipjax.checkpoint import Checkpointer, abstract_with_shardings
from clipjax.run_store.record import (
    RestoreError,
    check_params_compatible,
    read_run,
    restore_params,
    run_record,
    run_tokenizer,
)
from clipjax.run_store.resume import ResumeError, check_resume


@dataclasses.dataclass
class Run:
    """The run a workdir holds (`stored` None: none yet), accepted for the config about to train."""

    checkpointer: Checkpointer
    stored: dict | None  # its recorded config
    meta: dict | None  # its newest readable checkpoint's meta
    num_train: int | None  # the dataset size a resumed run takes from its record

    @property
    def resumes(self) -> bool:
        """Whether training continues the workdir's own run (`initial_state` then restores into
        the abstract state it is given)."""
        return self.stored is not None

    def tokenizer(self, config, source, *, log):
        """The checkpoint's; for a new run from `init_from`, the old run's token ids (unless its
        text tower starts afresh); else the data `source`'s."""
        towers = tuple(config.init_from_towers)
        if self.stored is None and config.init_from and (not towers or "text_tower" in towers):
            return run_tokenizer(read_run(config.init_from, log=log)[1], source)
        return run_tokenizer(self.meta, source)

    def initial_state(self, config, state, shardings, mesh, tokenizer, *, log) -> tuple:
        """(step, state, data-iterator state, the data stream's offset, examples seen at `step`):
        the run's newest restorable checkpoint (`state` then need only be abstract: shapes, dtypes,
        shardings), else `state` (freshly built, with `shardings`) holding the parameters of
        `config.init_from` where it names a run. A data-iterator state of None starts the stream
        at the offset."""
        if self.resumes:
            return self._resume(config, state, shardings, log)
        if config.init_from:
            towers = tuple(config.init_from_towers)
            _, params, init_step = restore_params(config.init_from, config, tokenizer, mesh, parts=towers)
            if towers:  # those parts from the old run, the rest as initialised
                params = jax.device_put(params, {p: shardings["params"][p] for p in params})
                state["params"] = {**state["params"], **params}
                names = ", ".join(dict.fromkeys(towers))
                log(f"initialised {names} from the weights of {config.init_from} at step {init_step}")
            else:
                state["params"] = jax.device_put(params, shardings["params"])
                log(f"initialised from the weights of {config.init_from} at step {init_step}")
        return 0, state, None, 0, 0

    def _resume(self, config, state, shardings, log) -> tuple:
        checkpointer = self.checkpointer
        _refuse_other_shapes(checkpointer, state["params"])
        restored, damaged = checkpointer.restore_latest(abstract_with_shardings(state, shardings), log=log)
        for bad in damaged:
            # Set aside, not deleted: the step can be saved again, and nothing is lost. One
            # process moves it; the others wait and see the folder without it.
            if jax.process_index() == 0:
                log(f"WARNING: moved the unreadable checkpoint {bad} to {checkpointer.set_aside(bad)}")
        if damaged and jax.process_count() > 1:
            multihost_utils.sync_global_devices("clipjax: damaged checkpoints set aside")
            checkpointer.manager.reload()
        if restored is None:
            raise ResumeError(
                f"no checkpoint in {checkpointer.directory} can be restored; see the warnings above"
            )
        step, state, data_state = restored
        meta = checkpointer.meta(step) or self.meta
        old_batch = int(self.stored["data"]["batch_size"])
        examples = int(meta["examples_seen"]) if meta else step * old_batch
        data_offset = int(meta["data_offset"]) if meta else 0
        if old_batch != config.data.batch_size:
            # Same stream of examples, read on from where the old batch size left it.
            data_offset, data_state = examples, None
            log(
                f"global batch {old_batch} -> {config.data.batch_size}: the data continues at example {examples}"
            )
        log(f"resumed from {checkpointer.directory} at step {step}")
        return step, state, data_state, data_offset, examples


def open_run(config, workdir: str, checkpointer: Checkpointer, *, log) -> Run:
    """The workdir's run, after ResumeError unless `config` may continue it (the accepted changes
    are logged); a config that leaves `data.num_train` unset takes the run's."""
    stored, meta = run_record(checkpointer, log=log)
    num_train = None
    if stored is not None:
        if not config.data.num_train:
            num_train = config.data.num_train = int(stored.get("data", {}).get("num_train") or 0)
        changes = check_resume(stored, config, workdir, saved_step=checkpointer.latest_step())
        for key, (old, new) in changes.items():
            log(f"resuming with {key} changed: {old!r} -> {new!r}")
    elif config.init_from and paths.resolve(config.init_from) == paths.resolve(workdir):
        raise ResumeError(f"init_from: {config.init_from!r} is this workdir; a run cannot start from itself")
    return Run(checkpointer, stored, meta, num_train)


def _refuse_other_shapes(checkpointer: Checkpointer, params) -> None:
    """A model change allowed by `resume.allow_changes` that changes parameter shapes is refused
    here, before restoring: such checkpoints are not damaged and must not be set aside."""
    for step in reversed(checkpointer.all_steps()):
        try:
            saved = checkpointer.params_metadata(step)
        except Exception:  # noqa: BLE001 - unreadable: judged (and set aside) by the restore
            continue
        try:
            check_params_compatible(saved, params, step)
        except RestoreError as e:
            raise ResumeError(
                f"{e}; use a new --workdir (or --config.init_from for a compatible model)"
            ) from None
        return
