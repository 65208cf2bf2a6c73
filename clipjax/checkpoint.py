"""Orbax checkpoints: train state, data-iterator state and step in one atomic, async checkpoint."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _iterator_state_to_json(state: Any) -> dict:
    # grain returns a dict for MapDataset iterators and JSON bytes for DataLoader iterators.
    if isinstance(state, (bytes, bytearray)):
        return {"__bytes__": state.decode("utf-8")}
    return json.loads(json.dumps(state))


def _iterator_state_from_json(saved: dict) -> Any:
    if "__bytes__" in saved:
        return saved["__bytes__"].encode("utf-8")
    return saved


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the items clipjax stores."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any | None = None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(_iterator_state_to_json(data_state))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, *, with_data: bool = True) -> tuple[Any, Any]:
        """Restore onto the shardings carried by `abstract_state` (ShapeDtypeStructs with sharding)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        data = restored.get("data") if with_data else None
        return restored["state"], (_iterator_state_from_json(data) if data is not None else None)

    def restore_latest(self, abstract_state: Any, *, log=print) -> tuple[int, Any, Any] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None if there is none.

        Orbax only lists checkpoints whose save finished (a save writes to a temporary folder
        and renames it when complete), so an interrupted save is never picked. A finished one
        that was damaged afterwards fails to restore and the previous one is tried.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
                log(
                    f"WARNING: checkpoint {step} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying an older one"
                )
                continue
            return step, state, data
        return None

    def _state_path(self, step: int) -> str:
        path = os.path.join(self.directory, str(step), "state")
        if not os.path.isdir(path):
            steps = self.all_steps()
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {self.directory} (steps: {steps or 'none'})"
            )
        return path

    def params_metadata(self, step: int) -> Any:
        """The saved parameter tree as ShapeDtypeStructs (no sharding), read without restoring."""
        tree = ocp.PyTreeCheckpointer().metadata(self._state_path(step)).item_metadata
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
