"""Orbax checkpoints: train state, data-iterator state and what a checkpoint needs to be used on
its own, in one atomic, asynchronous checkpoint per step.

    checkpoints/<step>/state   params, opt_state, step and counters (sharded arrays)
    checkpoints/<step>/data    the data iterator's position (JSON)
    checkpoints/<step>/meta    format version, the run's resolved config, the tokenizer (the
                               sentencepiece model itself), image preprocessing, examples seen

A save writes to a temporary folder that Orbax renames when complete, so a save interrupted by
a crash is never listed; a failed write is raised (`CheckpointWriteError`, naming its step) at
the next save or wait, never left to fail later. A checkpoint that cannot be read is reported with its reason;
the trainer moves it to `<workdir>/damaged_checkpoints/` so the step can be written again.

The workdir may be a bucket (`gs://`, `s3://`; docs/checkpoints.md, "Buckets"). There a save
writes in place and marks itself complete with a `commit_success.txt` written last, since an
object store has no rename; Orbax lists only steps that have it. Orbax sends `gs://` arrays to
tensorstore's gcs driver itself; `s3://` it only knows as a local path, so `_route_s3` hands
those to tensorstore's s3 driver.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from clipjax import paths
from clipjax.run_store import layout

FORMAT_VERSION = 2

# Orbax splits the saving of a replicated shard among its replicas ("replica-parallel"), cutting
# each into slices with a small program compiled per array shape: worth it where the slices are
# large, a loss where they are small (the tiny demo compiled 152 slicing programs, 4-5 s of a
# 20 s run on CPU). Slices below this size are saved whole by their first replica instead.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler():
    # Orbax's own modules: the public `register_type_handler` logs a warning on every override,
    # which would be a line in every run's output; the metadata store is the default handler's.
    from orbax.checkpoint._src.metadata.array_metadata_store import Store
    from orbax.checkpoint._src.serialization.type_handler_registry import GLOBAL_TYPE_HANDLER_REGISTRY

    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=Store(), min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
    )
    GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True, ignore_warnings=True)


_register_array_handler()


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message is one line."""


def one_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit] if text else ''}"


def _iterator_state_to_json(state: Any) -> dict:
    # grain returns a dict for MapDataset iterators and JSON bytes for DataLoader iterators.
    if isinstance(state, (bytes, bytearray)):
        return {"__bytes__": state.decode("utf-8")}
    return json.loads(json.dumps(state))


def _iterator_state_from_json(saved: dict) -> Any:
    if "__bytes__" in saved:
        return saved["__bytes__"].encode("utf-8")
    return saved


def s3_kvstore(url: str) -> dict:
    """tensorstore's kvstore spec of an s3:// URL. Unlike boto3 and s3fs, tensorstore does not read
    the endpoint from the environment, so the same variables are passed on here."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # Keys in the environment are what the default chain would find first, but building the
        # chain also reads ~/.aws/config and ~/.aws/credentials and sets up STS, and the AWS
        # library logs each file missing and each step skipped as an error: about 30 lines on
        # the console per run. Asked for the environment's keys, it looks nowhere else.
        spec["context"] = {"aws_credentials": {"type": "environment"}}
    return spec


_S3_ROUTED = False


def _route_s3() -> None:
    """Make Orbax write and read the arrays of s3:// checkpoints through tensorstore's s3 driver.

    Orbax (0.12) builds a tensorstore kvstore for `gs://` paths and treats every other path as a
    local file (it refuses `s3://...` as "not absolute"). Its three private helpers that decide
    this are wrapped to treat `s3://` like `gs://` with the s3 spec; nothing changes for other
    paths. Checked here, so a future Orbax without them fails with one line, only for s3.
    """
    global _S3_ROUTED
    if _S3_ROUTED:
        return
    try:
        from orbax.checkpoint._src.path import gcs_utils
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        normalize, remote, gcs_kvstore = (
            ts_utils._normalize_path,
            ts_utils._use_gcs_driver,
            gcs_utils.get_kvstore_for_gcs,
        )
    except (ImportError, AttributeError) as e:
        raise CheckpointWriteError(
            f"s3:// checkpoints need Orbax's tensorstore path helpers, which this Orbax "
            f"({getattr(ocp, '__version__', '?')}) lacks ({one_line(e)}); use gs:// or a local workdir"
        ) from None

    def _normalize(path):
        path = str(path)
        # os.path.normpath would fold 's3://' into 's3:/'.
        return "s3://" + os.path.normpath(path[5:]) if path.startswith("s3://") else normalize(path)

    ts_utils._normalize_path = _normalize
    ts_utils._use_gcs_driver = lambda directory: directory.startswith("s3://") or remote(directory)
    gcs_utils.get_kvstore_for_gcs = lambda path: (
        s3_kvstore(path) if path.startswith("s3://") else gcs_kvstore(path)
    )
    _S3_ROUTED = True


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the items clipjax stores."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        # A bucket URL stays a URL: made "absolute" it would become a local folder named 'gs:'.
        self.workdir = paths.resolve(workdir)
        self.directory = paths.join(self.workdir, layout.CHECKPOINTS)
        remote = paths.is_remote(self.directory)
        if self.directory.startswith("s3://"):
            _route_s3()
        if remote:
            paths.refresh(self.directory)  # steps another process saved since this one last looked
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=create,  # readers (load, evaluate) pass False: they write nothing
            # Temporary folders of saves that a crash interrupted are removed, not tripped on; by
            # the trainer only: a reader would remove a running trainer's save in progress, and its
            # background cleanup, unfinished at exit, printed a traceback after the reader's error.
            cleanup_tmp_directories=create,
            # Orbax's default for gs:// only; an S3 "rename" is a copy of every object.
            temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath if remote else None,
        )
        self.manager = ocp.CheckpointManager(paths.path(self.directory), options=options)
        self._writing: int | None = None  # the step of the save in progress, for error messages
        self._failed = False  # a write failure was raised once: not again at close

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any | None = None, meta: dict | None = None) -> bool:
        """Start writing checkpoint `step`; raises CheckpointWriteError if the previous
        (asynchronous) write failed, or this one cannot start."""
        self.wait()
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(_iterator_state_to_json(data_state))
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        self._writing = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure to write stops the run with its reason
            raise self._write_failed(e) from e

    def restore(self, step: int, abstract_state: Any, *, with_data: bool = True) -> tuple[Any, Any]:
        """Restore onto the shardings carried by `abstract_state` (ShapeDtypeStructs with sharding)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        data = restored.get("data") if with_data else None
        return restored["state"], (_iterator_state_from_json(data) if data is not None else None)

    def read_everything(self, step: int) -> dict:
        """Every item of checkpoint `step` read in full, arrays as saved: a check that it is whole."""
        items = {"state": ocp.args.StandardRestore(), "data": ocp.args.JsonRestore()}
        if paths.isdir(paths.join(self.directory, str(step), "meta")):
            items["meta"] = ocp.args.JsonRestore()
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def meta(self, step: int) -> dict | None:
        """The checkpoint's `meta` item, or None for checkpoints written before it existed."""
        if not paths.isdir(paths.join(self.directory, str(step), "meta")):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(
        self, abstract_state: Any, *, log=print
    ) -> tuple[tuple[int, Any, Any] | None, list[int]]:
        """((step, state, data_state) of the newest checkpoint that restores, or None; the newer
        steps that could not be read).

        Orbax only lists checkpoints whose save finished, so an interrupted save is never picked.
        """
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
                damaged.append(step)
                log(f"WARNING: checkpoint {step} in {self.directory} cannot be restored ({one_line(e)})")
                continue
            return (step, state, data), damaged
        return None, damaged

    def set_aside(self, step: int) -> str:
        """Move checkpoint `step` out of the checkpoint folder (to damaged_checkpoints/), so the
        step can be written again; nothing is deleted."""
        target_dir = paths.join(self.workdir, layout.DAMAGED_CHECKPOINTS)
        paths.makedirs(target_dir)
        target = paths.join(target_dir, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        # In a bucket this is a copy of each object, then a delete: no rename exists there.
        paths.path(self.directory).joinpath(str(step)).rename(target)
        paths.refresh(self.directory)
        self.manager.reload()
        return target

    def _state_path(self, step: int) -> str:
        path = paths.join(self.directory, str(step), "state")
        if not paths.isdir(path):
            steps = self.all_steps()
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {self.directory} (steps: {steps or 'none'})"
            )
        return path

    def params_metadata(self, step: int) -> Any:
        """The saved parameter tree as ShapeDtypeStructs (no sharding), read without restoring."""
        # Read by the item's handler: a Checkpointer would take `<step>/state` for a step of its
        # own and warn, on every load, that it has no step metadata file (`_CHECKPOINT_METADATA`
        # is one level up, where the CheckpointManager wrote it).
        handler = ocp.PyTreeCheckpointHandler()
        try:
            tree = handler.metadata(paths.path(self._state_path(step)))
        finally:
            handler.close()
        if tree is None or "params" not in tree:
            raise ValueError(f"checkpoint {step} has no readable parameter metadata")
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree["params"])

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters (no optimizer state), placed by the shardings in `abstract_params`.

        The shardings may belong to any mesh: a checkpoint written on 8 devices or 2 hosts
        restores onto 1 device, or the reverse.
        """
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        restored = ocp.PyTreeCheckpointer().restore(
            self._state_path(step),
            args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True
            ),
        )
        return restored["params"]

    def wait(self) -> None:
        """Block until the save in progress is written; CheckpointWriteError, naming its step,
        if it failed. (Orbax itself would only raise it from a later save, under that save's step.)"""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            if self._failed:
                return  # raised already; Orbax keeps raising it
            raise self._write_failed(e) from e

    def _write_failed(self, error: BaseException) -> CheckpointWriteError:
        """The one-line error of a failed write, once its partial folder is removed: the steps
        before it stay as they were, and nothing of the failed one is left (a full disk gets
        its space back at once, not at the next start)."""
        self._failed = True
        step = self._writing
        self._remove_partial_save()
        # A full disk, said the same way whichever writer met it first (through tensorstore it
        # is a long RESOURCE_EXHAUSTED message that names the cause only at its end).
        reason = one_line(error)
        if "No space left on device" in str(error) and "No space left on device" not in reason:
            reason = "No space left on device"
        return CheckpointWriteError(f"checkpoint {step} could not be written to {self.directory} ({reason})")

    def _remove_partial_save(self) -> None:
        """Remove what the failed save of step `_writing` wrote. Orbax writes a local step into
        '<step>.orbax-checkpoint-tmp...' and renames it when complete; a bucket's step is only
        listed once its commit file exists, and is left as it is."""
        if self._writing is None or paths.is_remote(self.directory):
            return
        pattern = f"{self._writing}{ocp.path.atomicity.TMP_DIR_SUFFIX}*"
        for partial in paths.path(self.directory).glob(pattern):
            shutil.rmtree(partial, ignore_errors=True)

    def close(self) -> None:
        """Finish the save in progress and let go; a failed write that was already raised is
        not raised again (it would replace the error the run is ending with)."""
        try:
            self.wait()
            # Orbax's close does not wait for the removal of old temporary folders it started in
            # the background; still running at exit, it prints a traceback after our last line.
            cleanup = getattr(self.manager, "_cleanup_tmp_directory_future", None)
            if cleanup is not None:
                cleanup.result()
        finally:
            self.manager.close()
            if self._failed:  # again: the failed save's other writers may have gone on until now
                self._remove_partial_save()


def newest_readable(steps: list[int], read: Callable[[int], Any], *, log=print, what: str = "checkpoint"):
    """(step, read(step)) for the newest step that reads, logging each one skipped and why."""
    for step in reversed(sorted(steps)):
        try:
            return step, read(step)
        except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
            log(f"WARNING: skipping {what} {step}: it cannot be read ({one_line(e)})")
    return None, None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
