"""What a run records in its workdir, and reading it back: config.json, each checkpoint's `meta`
(config, tokenizer, preprocessing, examples seen), and parameters restored after a check that
they fit the model.

Nothing here reads the training data to use a checkpoint: the config, the tokenizer and the
preprocessing come from the checkpoint itself (checkpoints of the first release, which lack
them, fall back to config.json and the data). A checkpoint that cannot be read is skipped for
the newest one that can, with a warning that says why.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
from flax import nnx

from clipjax import paths
from clipjax.checkpoint import Checkpointer, abstract_with_shardings, newest_readable, one_line
from clipjax.config import config_from_dict, config_json
from clipjax.data.tokenizers import tokenizer_from_json, tokenizer_to_json
from clipjax.models import model_factory
from clipjax.parallel import param_shardings
from clipjax.pretrained.preprocessing import describe as image_resize_description
from clipjax.run_store import layout

# Fields holding paths, stored absolute so the run can be used from any directory.
PATH_KEYS = (
    "data.data_dir",
    "data.source",
    "data.eval_source",
    "data.tokenizer.model_file",
    "data.tokenizer.vocab_file",
    "data.tokenizer.tokenizer_file",
)


class RestoreError(ValueError):
    """A workdir, step or config that cannot be restored; the message is one line."""


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with every relative path field made absolute (against this directory)."""
    config = copy.deepcopy(config)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        section = config
        for p in parents:
            section = section[p]
        value = section[leaf]
        if value and "://" not in value:
            section[leaf] = os.path.abspath(os.path.expanduser(value))
    return config


def checkpoint_meta(config, tokenizer, *, examples_seen: int, data_offset: int) -> dict:
    """The `meta` item of a checkpoint: enough to use it without the training data."""
    return {
        "format_version": 2,
        "config": json.loads(config_json(config, indent=None)),
        "tokenizer": tokenizer_to_json(tokenizer),
        "preprocessing": {
            "image_size": int(config.data.image_size),
            "resize": image_resize_description(config.model.get("image_resize", "crop")),
            "input": "RGB uint8 in [0, 255] (or float in [0, 1])",
            # What the model does to its input, (x - mean) / std; config.model holds the same.
            "mean": [float(v) for v in config.model.image_mean],
            "std": [float(v) for v in config.model.image_std],
        },
        "examples_seen": int(examples_seen),
        "data_offset": int(data_offset),
    }


def write_config(workdir: str, config) -> None:
    """config.json: the config of the run as it last started."""
    paths.write_atomic(paths.join(workdir, layout.CONFIG), config_json(config))


def holds_config(workdir: str) -> bool:
    return paths.exists(paths.join(workdir, layout.CONFIG))


def write_run(workdir: str, config, params, tokenizer) -> None:
    """A workdir of a run at step 0 (a converted checkpoint): the parameters in a checkpoint with
    the tokenizer in its meta, and config.json."""
    checkpointer = Checkpointer(workdir)
    try:
        meta = checkpoint_meta(config, tokenizer, examples_seen=0, data_offset=0)
        checkpointer.save(0, {"params": params}, meta=meta)
        checkpointer.wait()
    finally:
        checkpointer.close()
    write_config(workdir, config)


def _checked_workdir(workdir: str) -> Checkpointer:
    paths.refresh(workdir)  # a bucket's listings as they are now, not as this process last saw them
    if not paths.isdir(workdir):
        raise RestoreError(f"workdir {workdir!r} does not exist")
    if not paths.isdir(paths.join(workdir, layout.CHECKPOINTS)) and not holds_config(workdir):
        raise RestoreError(f"{workdir!r} is not a clipjax training workdir (no checkpoints/, no config.json)")
    return Checkpointer(workdir, create=False)


def run_record(checkpointer: Checkpointer, *, log=print) -> tuple[dict | None, dict | None]:
    """(config dict, meta) of the run whose checkpoints these are: the newest checkpoint whose
    meta reads, or config.json beside first-release checkpoints; (None, None) without checkpoints.
    The trainer's resume check and the readers below share it."""
    steps = checkpointer.all_steps()
    if not steps:
        return None, None
    _, meta = newest_readable(steps, checkpointer.meta, log=log, what="metadata of checkpoint")
    if meta is not None:
        return meta["config"], meta
    if holds_config(checkpointer.workdir):
        return json.loads(paths.read_text(paths.join(checkpointer.workdir, layout.CONFIG))), None
    return None, None


def read_run(workdir: str, *, log=print) -> tuple[ml_collections.ConfigDict, dict | None]:
    """(config, meta) of a workdir's run; config.json alone serves a workdir without checkpoints."""
    checkpointer = _checked_workdir(workdir)
    try:
        stored, meta = run_record(checkpointer, log=log)
    finally:
        checkpointer.close()
    if stored is None:
        path = paths.join(workdir, layout.CONFIG)
        if not paths.exists(path):
            raise RestoreError(f"{path} not found: {workdir!r} is not a clipjax training workdir")
        stored = json.loads(paths.read_text(path))
    return config_from_dict(stored), meta


def load_run_config(workdir: str, *, log=print) -> ml_collections.ConfigDict:
    """The run's config, as its newest readable checkpoint recorded it (or its config.json)."""
    return read_run(workdir, log=log)[0]


def run_tokenizer(meta: dict | None, source):
    """The tokenizer the run was trained with: from its checkpoint's meta, whatever the data says
    now, or (first-release checkpoints, `meta` None) rebuilt from the data `source`."""
    return tokenizer_from_json(meta["tokenizer"]) if meta else source.tokenizer()


def restore_params(
    workdir: str, config, tokenizer, mesh, step: int | None = None, *, parts: Sequence[str] = (), log=print
):
    """(graphdef, params, step): parameters only, placed on `mesh` by the config's sharding rules.

    Without `step`, the newest checkpoint that reads; unreadable ones are skipped with a warning.
    A checkpoint whose parameters do not fit `config.model` is an error, never skipped.

    `parts` (top-level names of the parameter tree: 'image_tower', 'image_proj', ...): only those
    are read, checked and returned (`params` then holds just them); the rest of the checkpoint
    may belong to another model.
    """
    checkpointer = _checked_workdir(workdir)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise RestoreError(f"no checkpoint in {checkpointer.directory}")
        if step is not None and step not in steps:
            raise RestoreError(f"no checkpoint at step {step} in {checkpointer.directory} (steps: {steps})")
        abstract_model = nnx.eval_shape(model_factory(config, vocab_size=tokenizer.vocab_size))
        graphdef, _ = nnx.split(abstract_model)
        expected = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
        target = abstract_with_shardings(
            expected, param_shardings(abstract_model, mesh, config.sharding_rules)
        )
        parts = tuple(dict.fromkeys(parts))
        unknown = [p for p in parts if p not in expected]
        if unknown:
            raise RestoreError(
                f"{unknown[0]!r} is not a part of the model (parts: {', '.join(sorted(expected))})"
            )
        if parts:
            expected = {p: expected[p] for p in parts}
            target = {p: target[p] for p in parts}
        for candidate in [step] if step is not None else reversed(steps):
            try:
                saved = checkpointer.params_metadata(candidate)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint
                saved, error = None, e
            if saved is not None:
                if parts:
                    missing = [p for p in parts if p not in saved]
                    if missing:
                        raise RestoreError(
                            f"checkpoint {candidate} in {checkpointer.directory} has no part {missing[0]!r} "
                            f"(it has: {', '.join(sorted(saved))})"
                        )
                    saved = {p: saved[p] for p in parts}
                check_params_compatible(saved, expected, candidate)
                try:
                    return graphdef, checkpointer.restore_params(candidate, target), candidate
                except Exception as e:  # noqa: BLE001 - unreadable arrays: a damaged checkpoint
                    error = e
            if step is not None:
                raise RestoreError(
                    f"checkpoint {step} in {checkpointer.directory} cannot be read ({one_line(error)})"
                )
            log(
                f"WARNING: skipping checkpoint {candidate} in {checkpointer.directory}: it cannot be read ({one_line(error)})"
            )
        raise RestoreError(f"no checkpoint in {checkpointer.directory} can be read (steps: {steps})")
    finally:
        checkpointer.close()


def _flat_by_name(tree) -> dict[str, Any]:
    # Orbax stores list indices as string keys: compare paths as names.
    def name(path):
        return "".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))!s}]" for k in path)

    return {name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params_compatible(saved, expected, step: int) -> None:
    """RestoreError (one line) unless the saved parameter tree has the expected names and shapes."""
    flat_saved, flat_expected = _flat_by_name(saved), _flat_by_name(expected)
    for key in sorted(set(flat_saved) | set(flat_expected)):
        if key not in flat_saved:
            raise RestoreError(
                f"checkpoint {step} does not match the model config: it has no parameter params{key}"
            )
        if key not in flat_expected:
            raise RestoreError(
                f"checkpoint {step} does not match the model config: unexpected parameter params{key}"
            )
        if tuple(flat_saved[key].shape) != tuple(flat_expected[key].shape):
            raise RestoreError(
                f"checkpoint {step} does not match the model config: params{key} has shape "
                f"{tuple(flat_saved[key].shape)} in the checkpoint but {tuple(flat_expected[key].shape)} in the config"
            )
