"""Guards around a run's workdir: one writer at a time, and no resume into another model.

One writer. Two `train.py` processes on one workdir race: each deletes the other's
temporary checkpoint folders and TensorBoard gets every step twice. `WorkdirLock` holds an
exclusive `fcntl.flock` on `<workdir>/train.lock`, a file naming the holder's host and pid.
The kernel drops a flock when its process dies (SIGKILL included), so a dead run never
blocks the next; a lock file whose flock is free but which still names a holder was left by
such a run and is reported ("stale") as it is taken over. Only process 0 of a
multi-process job locks: the other processes are the same run. A remote workdir (gs://)
has no flock and no atomic create-if-absent through `epath`; a marker object there could
not tell a live holder from a dead one (no pid to probe on another host) and would block
every restart after a crash, so remote workdirs are not locked, with a logged warning.

Resume compatibility. A checkpoint restores only into the model it was saved from; a
different size otherwise fails deep inside Orbax with a shape error. `config_mismatch`
compares the run config saved with the checkpoint to this run's, over the fields that
shape the state or fix what the output means (`FROZEN_FIELDS`); the training schedule,
logging, mesh and data location may change on resume.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath

from dithead_jax.training import metrics as metrics_lib

LOCK_NAME = "train.lock"

# Fields that must match the checkpoint's, as names or section prefixes: they fix the
# shapes and layout of the parameters and optimizer state (model.*, scan_layers included:
# it stacks the blocks; the discriminator's size), or what the network's output means (the
# noise schedule and prediction target: an epsilon model trained on as v-prediction would be
# wrong without any error). Everything else (train.*, mesh, data.*, logging periods, loss
# weights, diffusion.mask_weight) may change between a run and its resume.
FROZEN_FIELDS = (
    "stage", "target", "model.", "diffusion.num_timesteps", "diffusion.schedule",
    "diffusion.beta_start", "diffusion.beta_end", "diffusion.prediction",
    "loss.disc_layers", "loss.disc_channels", "loss.disc_norm",
)  # fmt: skip
# ... except the model's execution knobs, which change how the step computes, not the state.
RESUMABLE_MODEL_FIELDS = ("model.dtype", "model.remat_policy", "model.attention_impl")


def _frozen(name: str) -> bool:
    if name in RESUMABLE_MODEL_FIELDS:
        return False
    return any(name == f or (f.endswith(".") and name.startswith(f)) for f in FROZEN_FIELDS)


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


class ResumeMismatchError(ValueError):
    """The workdir's checkpoints were saved by a different model than this run's."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


class WorkdirLock:
    """Context manager: the exclusive lock on a local workdir (a no-op for remote ones).

    Raises `WorkdirBusyError` naming the holder (host and pid) if another process has it.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True) -> None:
        self.workdir = os.fspath(workdir)
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        if "://" in self.workdir:
            logging.warning(
                "%s is remote: not locked against a second train.py on it (see "
                "dithead_jax/training/workdir.py)",
                self.workdir,
            )
            return self
        path = os.path.join(self.workdir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.workdir} is in use by another train.py ({holder}); wait for it to "
                f"finish, stop it, or use another --workdir"
            ) from None
        previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if previous:
            note = ""
            host, _, pid = previous.partition(" pid ")
            if host == f"host {socket.gethostname()}" and pid.isdigit() and _alive(int(pid)):
                note = " (that pid is alive but holds no lock: a filesystem without flock?)"
            logging.warning("Taking over the stale lock %s left by %s%s", path, previous, note)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            # Emptied, not deleted: unlinking a flock'd file lets a third process lock a
            # new inode while a second still waits on the old one. Empty means "released".
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the flock
            self._fd = None


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted names -> leaves, tuples as lists (a saved config comes back from JSON)."""
    flat = metrics_lib.flatten_dict(tree)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def config_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`field: A in the checkpoint, B now` for every differing frozen field (see
    `FROZEN_FIELDS`). Fields on one side only are skipped: a config saved before a field
    existed must still resume, and every size that shapes the state is on both sides."""
    old, new = _flatten(saved), _flatten(current)
    differ = []
    for name in sorted(set(old) & set(new)):
        if _frozen(name) and old[name] != new[name]:
            differ.append(f"{name}: {old[name]!r} in the checkpoint, {new[name]!r} now")
    return differ


def check_resume_config(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None, directory: epath.Path
) -> None:
    """Raises `ResumeMismatchError` (one line) if the checkpoint was saved by a different
    model."""
    if saved is None or current is None:
        return
    differ = config_mismatch(saved, current)
    if differ:
        raise ResumeMismatchError(
            f"the checkpoints in {directory} were saved by a different model: "
            + "; ".join(differ)
            + ". Resume with the checkpoint's settings, or start a fresh run with another "
            "--workdir"
        )
