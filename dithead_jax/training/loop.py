"""The training loop shared by both stages: resume, step, log, preview, checkpoint, stop.

    state <- latest checkpoint in <workdir>/checkpoints (and the data iterator with it)
    for step in start+1 .. num_steps:
        state, metrics = train_step(state, to_global(next(batches)))
        every log_every:        loss, grad norm, lr, steps/s, examples/s, MFU -> writer
        every image_every:      task.preview(state) image grid -> writer
        every checkpoint_every: async checkpoint (and at the end, and on SIGTERM)
    wait for checkpoints to land

Metrics are read one step late: step s's scalars are fetched after step s+1 has been
dispatched, so the host never idles the device just to look at a loss. The step itself
refuses to apply a non-finite update (see `state.guard_update`: loss, gradient norm and the
updated parameters); the loop stops on the first non-finite one with `NonFiniteLossError`,
saving nothing, so the newest checkpoint on disk is the last good state.

Preemption. A checkpoint save is collective: every process must decide to stop at the same
step. With `jax.distributed` running (any multi-process run, see `dithead_jax/distributed.py`)
JAX's preemption notifier owns SIGTERM: a signal to any one process reaches the others
through the coordination service, and `reached_preemption` (Orbax over
`multihost_utils.reached_preemption_sync_point`, a local check every step, no host sync)
answers True on every process at one agreed step. The loop then installs no Python handler
(it would replace JAX's). Without the service, SIGTERM sets a flag read after each step.
Either way the loop saves that step, waits for the write and returns `preempted=True`;
train.py exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL) so a scheduler can tell a run to
requeue from a finished one (0) or one stopped on a non-finite value (`EXIT_NON_FINITE`, 3).

Resume takes the newest checkpoint that restores: a corrupt one is logged and moved aside
(`Checkpointer.restore_newest_intact`); one saved by a different model is refused with the
differing fields named (`workdir.check_resume_config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from dithead_jax import distributed
from dithead_jax.config import TrainConfig
from dithead_jax.training import metrics as metrics_lib
from dithead_jax.training.checkpoint import Checkpointer, as_path
from dithead_jax.training.workdir import check_resume_config

# train.py's exit statuses (bad flags, config or data: `cli.EXIT_BAD_INPUT`, 2).
EXIT_FINISHED = 0
# Preempted and saved its state: sysexits.h EX_TEMPFAIL ("try again later"), which
# schedulers can map to requeue.
EXIT_PREEMPTED = 75
# Stopped on a non-finite loss, gradient or parameter without saving that state: requeueing
# repeats it; lower the learning rate or look at the data. Not 1, which any crash gives.
EXIT_NON_FINITE = 3


def config_dict(config: Any) -> dict[str, Any]:
    """A run config (ConfigDict or mapping) as the plain dict saved with checkpoints."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def host_rows(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
    """The rows [start, stop) of a (global_batch, ...) array that this process's devices
    hold under `sharding`: what this process reads and hands `make_global_batch`."""
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        held.update(range(global_batch)[index[0]])
    start, stop = min(held), max(held) + 1
    if len(held) != stop - start:
        raise ValueError(
            f"this process's devices hold rows {sorted(held)} of the batch, not one contiguous "
            "range; build the mesh with jax.make_mesh (contiguous per process)"
        )
    return start, stop


def global_batcher(
    keys: tuple[str, ...], batch_sharding: Any, global_batch: int | None = None
) -> Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]]:
    """host rows -> global (global_batch, ...) `jax.Array`s of `keys` (the stage's model
    inputs) on the mesh."""

    def to_global(host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        from dithead_jax.data.pipelines import make_global_batch

        return make_global_batch({k: host_batch[k] for k in keys}, batch_sharding, global_batch)

    return to_global


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the message names the good checkpoint."""


@dataclasses.dataclass
class Task:
    """What one training stage hands the loop.

    state: the freshly initialised, sharded train state (replaced on resume);
    abstract_state: its ShapeDtypeStructs with shardings (the restore target);
    train_step: jitted (state, global batch) -> (state, {"loss", "grad_norm", ...});
    batches: host-local batches; a grain iterator is checkpointed with the state;
    to_global: host batch -> global batch of `jax.Array`s;
    preview: optional state -> {name: (N, H, W, 3) image in [0, 1]} for the writer;
    examples_per_step / flops_per_step: global, for throughput and MFU;
    config: the run config (JSON-able), saved with every checkpoint.
    """

    state: Any
    abstract_state: Any
    train_step: Callable[[Any, Any], tuple[Any, Mapping[str, jax.Array]]]
    batches: Iterator[Mapping[str, np.ndarray]]
    to_global: Callable[[Mapping[str, np.ndarray]], Any]
    examples_per_step: int
    flops_per_step: float | None = None
    preview: Callable[[Any], Mapping[str, np.ndarray]] | None = None
    config: Mapping[str, Any] | None = None


@dataclasses.dataclass
class RunResult:
    state: Any
    start_step: int  # the step training resumed from (0 for a fresh run)
    final_step: int
    losses: dict[int, float]  # per step run in this call
    preempted: bool = False


class _StopFlag:
    """SIGTERM -> flag, restored on exit. Only the main thread may install handlers, and
    none is installed when `install` is False (JAX's notifier owns SIGTERM then)."""

    def __init__(self, install: bool = True) -> None:
        self.requested = False
        self._install = install
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if self._install and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _progress_bar(mode: str, total: int, initial: int) -> Any:
    interactive = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    if not interactive or jax.process_index() > 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _resume(ckpt: Checkpointer, task: Task) -> tuple[Any, int]:
    """(state, step) from the newest intact checkpoint, or (task.state, 0) if none."""
    latest = ckpt.latest_step()
    if latest is None:
        logging.info("Starting from step 0 (no checkpoint in %s)", ckpt.directory)
        return task.state, 0
    try:
        saved_config = ckpt.restore_config(latest)
    except Exception:  # noqa: BLE001 -- a broken config item is the fallback's business
        saved_config = None
    check_resume_config(saved_config, task.config, ckpt.directory)
    step, state = ckpt.restore_newest_intact(task.abstract_state, data_iter=task.batches)
    logging.info("Resuming from step %d (checkpoint in %s)", step, ckpt.directory)
    start = int(jax.device_get(state.step))
    if start != step:
        raise RuntimeError(f"checkpoint {step} holds a state at step {start}")
    return state, start


def run(task: Task, train: TrainConfig, workdir: str | os.PathLike) -> RunResult:
    """Trains `task` to `train.num_steps`, resuming from `workdir` if it holds checkpoints."""
    workdir = as_path(workdir)
    if train.num_steps <= 0 and not (workdir / "checkpoints").exists():
        # Nothing to train and nothing to resume: leave the workdir as it was.
        logging.info("Nothing to do: num_steps is %d (no checkpoint in %s)",
                     train.num_steps, workdir)  # fmt: skip
        return RunResult(state=task.state, start_step=0, final_step=0, losses={})
    ckpt = Checkpointer(
        workdir / "checkpoints",
        keep=train.keep_checkpoints,
        asynchronous=train.async_checkpoints,
    )
    try:
        state, start = _resume(ckpt, task)
    except BaseException:
        ckpt.close()
        raise
    if start >= train.num_steps:
        logging.info("Nothing to do: step %d >= num_steps %d", start, train.num_steps)
        ckpt.close()
        return RunResult(state=state, start_step=start, final_step=start, losses={})

    writer = metrics_lib.create_writer(workdir)
    if start == 0 and task.config is not None:
        writer.write_hparams(metrics_lib.flatten_config(task.config))
    throughput = metrics_lib.Throughput(
        task.examples_per_step,
        task.flops_per_step,
        metrics_lib.peak_flops_per_device(train.peak_tflops) if task.flops_per_step else None,
    )
    bar = _progress_bar(train.progress, train.num_steps, start)
    result = RunResult(state=state, start_step=start, final_step=start, losses={})
    window: dict[str, list[float]] = {}
    pending: tuple[int, Mapping[str, jax.Array]] | None = None

    def consume(step: int, device_metrics: Mapping[str, jax.Array]) -> None:
        """Host side of step `step`: finiteness check, averaging, logging."""
        values = {k: float(v) for k, v in jax.device_get(dict(device_metrics)).items()}
        loss = values["loss"]
        params_finite = values.get("params_finite", 1.0) == 1.0
        if not (
            params_finite and math.isfinite(loss) and math.isfinite(values.get("grad_norm", 0.0))
        ):
            ckpt.wait()
            good = ckpt.latest_step()
            where = f"step {good} in {ckpt.directory}" if good is not None else "none yet"
            what = (
                ""
                if params_finite
                else " (the update made parameters non-finite: lower the learning rate)"
            )
            raise NonFiniteLossError(
                f"non-finite loss ({loss}), gradient norm ({values.get('grad_norm')}) or "
                f"parameters at step {step}{what}; stopped without saving. Last good "
                f"checkpoint: {where}."
            )
        result.losses[step] = loss
        if step == start + 1:
            throughput.start(step)  # the first step compiled; time from here on
        for key, value in values.items():
            window.setdefault(key, []).append(value)
        if bar is not None:
            bar.update(1)
        if step % train.log_every == 0 or step == train.num_steps:
            scalars = {k: float(np.mean(v)) for k, v in window.items()}
            scalars["lr"] = values.get("lr", scalars.get("lr", 0.0))
            scalars |= throughput.measure(step)
            writer.write_scalars(step, scalars)
            window.clear()
            if bar is not None:
                bar.set_postfix(loss=f"{scalars['loss']:.4f}")

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            consume(*pending)
            pending = None

    step = start
    # jax.distributed's preemption service decides for every process; see the module doc.
    coordinated = distributed.is_initialized()
    try:
        with _StopFlag(install=not coordinated) as stop:
            while step < train.num_steps:
                host_batch = next(task.batches)
                state, device_metrics = task.train_step(state, task.to_global(host_batch))
                step += 1
                flush()  # the previous step's metrics, while this one runs
                pending = (step, device_metrics)
                preempt = stop.requested or (coordinated and ckpt.reached_preemption(step))
                if task.preview is not None and step % train.image_every == 0:
                    flush()
                    started = time.perf_counter()
                    writer.write_images(step, task.preview(state))
                    throughput.exclude(time.perf_counter() - started)
                if step % train.checkpoint_every == 0 or step == train.num_steps or preempt:
                    flush()  # never save a state whose loss was not checked
                    started = time.perf_counter()
                    ckpt.save(step, state, config=task.config, data_iter=task.batches)
                    throughput.exclude(time.perf_counter() - started)
                if preempt:
                    ckpt.wait()
                    logging.warning("Preempted: checkpoint of step %d saved; exiting", step)
                    result.preempted = True
                    break
            flush()
    finally:
        result.state, result.final_step = state, step
        if bar is not None:
            bar.close()
        with contextlib.suppress(Exception):
            writer.flush()
            writer.close()
        ckpt.close()
    return result
