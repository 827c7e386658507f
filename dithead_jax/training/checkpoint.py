"""Orbax checkpoints of a run: train state, run config and data-iterator position.

Layout: `<workdir>/checkpoints/<step>/{state, config, data_state}`, one directory per saved
step, written under a temporary name and renamed when complete, so a run killed at any
moment (SIGKILL included) leaves only whole checkpoints; unfinished temporaries are
removed when the next run opens the directory.

    state      TrainState (params, optimizer state, EMA, step) via StandardSave; restored
               straight into the target shardings, so a run may resume on another mesh
    config     the run config as JSON, for humans and for `describe`
    data_state the Grain iterator's state as one JSON, written by process 0 and read by
               every process: the pipelines make it the same on every process
               (`data/pipelines.py`), so a run saved by H processes resumes on any number
               and sees the batches an uninterrupted run would have seen. (Grain's own
               `grain.checkpoint` handler writes one file per process, named
               process_<i>-of-<H>.json, which a run with another H cannot find; older
               checkpoints with that `data_iter` item still restore on the same H.)

The directory is an `etils.epath` path: local, or gs:// and other remote stores, which
Orbax writes directly (nothing here turns a URL into a local path).

Saving is asynchronous: `save` blocks only while device arrays are copied out (so the
next step may donate them) and the grain state is read, then writes in the background;
`wait` / `close` block until everything is on disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# Orbax's replica-parallel save splits each replicated array among its replicas, which costs
# a compiled slice program per (shape, device) on the first save: ~10 s for the tiny DiT on
# 8 CPU devices, mostly for biases and norms. Slices under this size are written whole by
# one replica instead (Orbax's own knob); large weights still split.
MIN_REPLICA_SLICE_BYTES = 1 << 20
_handler_configured = False


def _configure_array_handler() -> None:
    global _handler_configured
    if not _handler_configured:
        # Orbax's default jax.Array handler, but for the slice size (the metadata store
        # is only importable from _src in orbax 0.12).
        from orbax.checkpoint._src.metadata import array_metadata_store

        handler = ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(),
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        )
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        _handler_configured = True


def _is_grain_iterator(it: Any) -> bool:
    return it is not None and hasattr(it, "get_state") and hasattr(it, "set_state")


def as_path(path: str | os.PathLike) -> epath.Path:
    """A run path as an `epath.Path`: URLs (gs://...) stay URLs, local paths become absolute
    (so a later chdir cannot move them)."""
    text = os.fspath(path)
    return epath.Path(text) if "://" in text else epath.Path(os.path.abspath(text))


def _jsonable(state: Any) -> Any:
    """Grain states are dicts of ints/strings/lists; numpy scalars become Python ones."""
    if isinstance(state, Mapping):
        return {str(k): _jsonable(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_jsonable(v) for v in state]
    return state.item() if hasattr(state, "item") else state


class Checkpointer:
    """A thin `ocp.CheckpointManager` wrapper: keep the newest `keep` checkpoints."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True):
        self.directory = as_path(directory)
        _configure_array_handler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        config: Mapping[str, Any] | None = None,
        data_iter: Any = None,
    ) -> bool:
        """Starts saving `state` (+ config JSON + grain iterator) as `step`; False if that
        step is already saved."""
        if step in self._manager.all_steps():
            return False
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(dict(config))
        if _is_grain_iterator(data_iter):
            items["data_state"] = ocp.args.JsonSave(_jsonable(data_iter.get_state()))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, *, data_iter: Any = None) -> Any:
        """The state saved at `step`, placed as `abstract_state` (ShapeDtypeStructs with
        shardings) says; if given, `data_iter` is moved to the saved position in place."""
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        saved = self._item_names(step)
        if _is_grain_iterator(data_iter):
            if "data_state" in saved:
                items["data_state"] = ocp.args.JsonRestore()
            elif "data_iter" in saved:  # the per-process files of older checkpoints
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            else:
                logging.warning("checkpoint %d has no data-iterator state; data restarts", step)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if "data_state" in items:
            data_iter.set_state(dict(restored["data_state"]))
        return restored["state"]

    def restore_config(self, step: int) -> dict[str, Any] | None:
        if "config" not in self._item_names(step):
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return dict(restored["config"])

    def _item_names(self, step: int) -> set[str]:
        path = self.directory / str(step)
        return {p.name for p in path.iterdir()} if path.is_dir() else set()

    def reached_preemption(self, step: int) -> bool:
        """True on every process, at one agreed step, once any process got a preemption
        notice (SIGTERM) through the jax.distributed service; without the service the
        loop's own SIGTERM handler decides."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
