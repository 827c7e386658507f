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

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
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


class UnrestorableError(RuntimeError):
    """No checkpoint of a run restores into the state this run built."""


def _first_line(error: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


# Orbax's JSON files in a checkpoint: step and item metadata, JsonSave items.
_JSON_NAMES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def _why_unreadable(step_dir: epath.Path, error: BaseException) -> str:
    """`error` as one line that names the bad file.

    Orbax wraps TensorStore's error, which names the array and the OCDBT database (the item
    folder) and the size of the value it found; the truncated data file is then the one of
    that size. A JSON decode error names no file, so the step's JSON files are parsed here
    to find it."""
    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in reversed(chain):  # the innermost message naming the step is the precise one
        reason = _first_line(e)
        if str(step_dir) in reason:
            size = re.search(r"value of size (\d+)", reason)
            if size:
                for path in step_dir.glob("*/ocdbt.process_*/d/*"):
                    if path.stat().length == int(size.group(1)):
                        return f"{path} is truncated or damaged ({reason})"
            return reason
    # Two levels (the step's and its items' metadata); epath cannot glob `**` (on GCS it
    # would list everything).
    for path in sorted([*step_dir.glob("*"), *step_dir.glob("*/*")]):
        if path.name in _JSON_NAMES or path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except (ValueError, OSError) as e:
                return f"{path} is not valid JSON ({_first_line(e)})"
    return _first_line(error)


def _agreed(ok: bool) -> bool:
    """True only if `ok` holds on every process (one small all-gather; none single-process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


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

    def restore_newest_intact(
        self, abstract_state: Any, *, data_iter: Any = None
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores; None if there is none.

        Newer checkpoints that failed to restore (a truncated array file, a broken
        `_METADATA`, an unreadable data-iterator JSON) are then logged with their step and
        the reason (the file named), and moved aside to `<directory>/corrupt-<step>`: kept
        for inspection, never deleted, and out of Orbax's way (its steps are plain numbers;
        left in place, the next save of that step number would be refused). A checkpoint
        counts as corrupt only when an older one restores into the same target: if none
        does, the target is what is wrong (another model), so nothing is moved and
        `UnrestorableError` names the newest failure. Every process must agree, so in a
        multi-process run a step counts only if it restored everywhere (one all-gather per
        step tried); process 0 moves the bad ones aside.
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, error = self.restore(step, abstract_state, data_iter=data_iter), None
            except Exception as e:  # noqa: BLE001 -- any reader error means "unusable"
                state, error = None, e
            if _agreed(error is None):
                self._set_aside(failed)
                return step, state
            reason = (
                _why_unreadable(self.directory / str(step), error) if error is not None
                else "unreadable on another process"
            )  # fmt: skip
            failed.append((step, reason))
        if failed:
            step, reason = failed[0]
            raise UnrestorableError(
                f"no checkpoint in {self.directory} restores into this run's state; the newest"
                f" (step {step}): {reason}. Start a fresh run with another --workdir"
            )
        return None

    def _set_aside(self, failed: list[tuple[int, str]]) -> None:
        for step, reason in failed:
            aside = self.directory / f"corrupt-{step}"
            logging.warning(
                "Skipped checkpoint %d in %s: %s. Moved it to %s.",
                step, self.directory, reason, aside,
            )  # fmt: skip
            if jax.process_index() == 0:
                (self.directory / str(step)).rename(aside)
        if failed:
            _agreed(True)  # everyone waits for the moves before the manager rescans
            self._manager.reload()

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


def restore_trained(
    workdir: str | os.PathLike,
    make_setup: Callable[[dict[str, Any]], Any],
    *,
    step: int | None = None,
    what: str = "checkpoint",
) -> tuple[dict[str, Any], Any, Any]:
    """A finished (or interrupted) run, for inference: the newest (or `step`'s) checkpoint
    in `workdir`, restored against `make_setup(its run config)` (a `state.StateSetup`, on
    whatever mesh the caller chose). Returns (run config, setup, restored TrainState).
    `what` names the run in errors ("no sync-expert checkpoint in ...")."""
    ckpt = Checkpointer(as_path(workdir) / "checkpoints")
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no {what} in {ckpt.directory}")
        config = ckpt.restore_config(step)
        if config is None:
            raise FileNotFoundError(f"checkpoint {step} in {ckpt.directory} has no run config")
        setup = make_setup(config)
        return config, setup, ckpt.restore(step, setup.abstract)
    finally:
        ckpt.close()
