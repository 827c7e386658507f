"""train.py as users run it, in subprocesses: SIGKILL mid-training, then resume from the
last checkpoint; SIGTERM (preemption) writes a checkpoint and exits 75; resume again and
finish. Also: a remote --workdir stays a URL.

One CPU device per process. The workdir's compilation cache (train.py puts one there)
spares the second and third processes the compile.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from stage2_data import write_random_stage2

from dithead_jax.training.loop import EXIT_PREEMPTED
from dithead_jax.training.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0


class Run:
    """train.py in a subprocess; stderr lines are collected by a reader thread."""

    def __init__(self, workdir: Path, data: Path, *overrides: str, cache: Path | None = None):
        env = dict(os.environ)
        if cache is not None:  # another workdir's compilation cache
            env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        # One device; LLVM -O0 compiles ~2.5x faster and is plenty for this tiny model.
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", f"{ROOT}/configs/dit.py:testing",
               "--workdir", str(workdir), f"--config.data.dir={data}",
               "--config.train.log_every=1", "--config.train.image_every=1000000",
               "--config.train.progress=none", *overrides]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        self.proc.kill()
        pytest.fail(f"no line matching {pattern!r}; output:\n{''.join(self.lines[-30:])}")

    def finish(self, timeout: float = TIMEOUT) -> str:
        self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return "".join(self.lines)


def _finished_steps(workdir: Path) -> list[int]:
    """Checkpoints that were completely written (temporaries carry a suffix)."""
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def test_sigkill_resumes_and_sigterm_saves(tmp_path):
    data = write_random_stage2(tmp_path / "records", videos=2, frames=24)
    workdir = tmp_path / "work"
    forever = "--config.train.num_steps=1000000"

    # 1. Killed without warning after checkpoints were written.
    run = Run(workdir, data, forever, "--config.train.checkpoint_every=3")
    run.wait_for(r"Starting from step 0")
    run.wait_for(r"\] \[7\] ")  # step 7 logged: checkpoints 3 and 6 are on their way
    deadline = time.monotonic() + TIMEOUT
    while 6 not in _finished_steps(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    assert run.proc.returncode == -signal.SIGKILL
    last = _finished_steps(workdir)[-1]
    assert last >= 6 and last % 3 == 0

    # 2. Resumes from the newest complete checkpoint; SIGTERM mid-training saves and exits.
    run = Run(workdir, data, forever, "--config.train.checkpoint_every=1000")
    run.wait_for(rf"Resuming from step {last} ")
    step = int(run.wait_for(rf"\] \[({last + 2})\] ").group(1))
    run.proc.send_signal(signal.SIGTERM)
    out = run.finish()
    assert run.proc.returncode == EXIT_PREEMPTED == 75, out[-3000:]  # saved; requeue me
    preempted = int(re.search(r"Preempted: checkpoint of step (\d+) saved", out).group(1))
    assert preempted >= step
    assert _finished_steps(workdir)[-1] == preempted

    # 3. Resumes from the preemption checkpoint and finishes.
    run = Run(workdir, data, f"--config.train.num_steps={preempted + 2}")
    run.wait_for(rf"Resuming from step {preempted} ")
    out = run.finish()
    assert run.proc.returncode == 0, out[-3000:]
    assert f"Training finished at step {preempted + 2} (resumed from step {preempted})" in out
    assert _finished_steps(workdir)[-1] == preempted + 2

    # 4. Every step's loss equals an uninterrupted run's exactly (metrics.jsonl keeps full
    # precision; a step re-run after the SIGKILL is read as its last line).
    fresh = tmp_path / "uninterrupted"
    run = Run(fresh, data, f"--config.train.num_steps={preempted + 2}", cache=workdir / "jax_cache")
    out = run.finish()
    assert run.proc.returncode == 0, out[-3000:]
    resumed, reference = read_jsonl(workdir / "metrics.jsonl"), read_jsonl(fresh / "metrics.jsonl")
    losses = {s: r["loss"] for s, r in reference.items() if "loss" in r}
    assert len(losses) == preempted + 2
    assert {s: r["loss"] for s, r in resumed.items() if "loss" in r} == losses


def test_workdir_urls_stay_urls(tmp_path):
    """gs:// workdirs reach Orbax and the writers as URLs (never made local); local paths
    are created and made absolute. Nothing here touches the network."""
    from dithead_jax.cli import run_dir
    from dithead_jax.training.checkpoint import as_path

    for url in ("gs://bucket/x", "gs://bucket/x/"):
        for path in (run_dir("train.py", url), as_path(url)):
            assert os.fspath(path).startswith("gs://bucket/x"), path
            assert os.fspath(path / "checkpoints") == "gs://bucket/x/checkpoints"
    local = run_dir("train.py", tmp_path / "a" / "b")
    assert local.is_dir() and local.is_absolute() and os.fspath(local) == str(tmp_path / "a/b")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert os.fspath(as_path("rel")) == str(tmp_path / "rel")  # no file:// needed
    finally:
        os.chdir(cwd)
