"""Orbax checkpoints of a run: train state, run config and data-iterator position.

Layout: `<workdir>/checkpoints/<step>/{state, config, data_iter}`, one directory per saved
step, written under a temporary name and renamed when complete, so a run killed at any
moment (SIGKILL included) leaves only whole checkpoints; unfinished temporaries are
removed when the next run opens the directory.

    state      TrainState (params, optimizer state, EMA, step) via StandardSave; restored
               straight into the target shardings, so a run may resume on another mesh
    config     the run config as JSON, for humans and for `describe`
    data_iter  Grain iterator state (one JSON per process), so resumed training sees the
               batches an uninterrupted run would have seen

Saving is asynchronous: `save` blocks only while device arrays are copied out (so the
next step may donate them) and the grain state is read, then writes in the background;
`wait` / `close` block until everything is on disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging


def _is_grain_iterator(it: Any) -> bool:
    return it is not None and hasattr(it, "get_state") and hasattr(it, "set_state")


class Checkpointer:
    """A thin `ocp.CheckpointManager` wrapper: keep the newest `keep` checkpoints."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
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
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, *, data_iter: Any = None) -> Any:
        """The state saved at `step`, placed as `abstract_state` (ShapeDtypeStructs with
        shardings) says; if given, `data_iter` is moved to the saved position in place."""
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        saved = self._item_names(step)
        if _is_grain_iterator(data_iter):
            if "data_iter" not in saved:
                logging.warning("checkpoint %d has no data-iterator state; data restarts", step)
            else:
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_config(self, step: int) -> dict[str, Any] | None:
        if "config" not in self._item_names(step):
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return dict(restored["config"])

    def _item_names(self, step: int) -> set[str]:
        path = os.path.join(self.directory, str(step))
        return set(os.listdir(path)) if os.path.isdir(path) else set()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the cluster announced a preemption (multi-host runs
        with `jax.distributed`); single-process runs rely on the loop's SIGTERM handler."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
