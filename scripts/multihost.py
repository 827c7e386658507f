"""Runs train.py as N processes on this machine through jax.distributed (a bare launch).

    python scripts/multihost.py [--processes 2] [--devices 4] [--port 0] -- \
        --config configs/dit.py:testing --workdir /tmp/dit2 --config.data.dir=LATENTS

Each process gets `--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I`
and, on CPU, `--xla_force_host_platform_device_count=D` simulated devices, so N x D devices
train as one mesh with gloo collectives -- the code path of a TPU pod or GPU cluster, minus
the hardware. Every process's output goes to `<workdir>/process_<I>.log` (and process 0's
also to the console). If one process fails, the others are killed (they would wait for it
in a collective until the coordination service times out). The exit status is process 0's
(0 finished, 75 preempted and saved: see train.py), or the first failure's.

`make multihost` runs the tiny DiT on random latents this way.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workdir(train_args: list[str]) -> Path | None:
    for i, arg in enumerate(train_args):
        if arg == "--workdir" and i + 1 < len(train_args):
            return Path(train_args[i + 1])
        if arg.startswith("--workdir="):
            return Path(arg.split("=", 1)[1])
    return None


class Launch:
    """N train.py processes; `wait` returns their exit statuses (killing all on a failure)."""

    def __init__(
        self,
        train_args: list[str],
        *,
        processes: int = 2,
        devices: int = 4,
        port: int = 0,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        echo: bool = False,
        distributed: bool = True,
    ):
        """distributed=False (one process only) runs a plain train.py, no jax.distributed."""
        if not distributed and processes != 1:
            raise ValueError("more than one process needs jax.distributed")
        port = port or free_port()
        log_dir = log_dir or _workdir(train_args) or Path(".")
        log_dir.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ if env is None else env)
        flags = [f for f in base.get("XLA_FLAGS", "").split() if "device_count" not in f]
        base["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        base.setdefault("JAX_PLATFORMS", "cpu")
        self.logs = [log_dir / f"process_{i}.log" for i in range(processes)]
        self.procs: list[subprocess.Popen] = []
        for i in range(processes):
            cmd = [sys.executable, str(ROOT / "train.py"), *train_args]
            if distributed:
                cmd += ["--coordinator_address", f"127.0.0.1:{port}",
                        "--num_processes", str(processes), "--process_id", str(i)]  # fmt: skip
            out = open(self.logs[i], "a")  # noqa: SIM115 - closed by the pump thread
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=base,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,  # a signal to one is not a signal to all
                )
            )
            threading.Thread(target=self._pump, args=(i, out, echo and i == 0), daemon=True).start()

    def _pump(self, i: int, out, echo: bool) -> None:
        with out:
            for line in self.procs[i].stdout:
                out.write(line)
                out.flush()
                if echo:
                    sys.stdout.write(line)

    def text(self, i: int) -> str:
        return self.logs[i].read_text()

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float | None = None) -> list[int]:
        """Exit statuses; on a failure (or timeout) the remaining processes are killed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                codes = [p.poll() for p in self.procs]
                if any(c not in (None, 0, 75) for c in codes):
                    time.sleep(5.0)  # let the others report the failure too, then stop
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"processes still running after {timeout:.0f} s")
                time.sleep(0.1)
        finally:
            self.kill()
        return [p.returncode for p in self.procs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=4, help="simulated CPU devices per process")
    p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's flags")
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if _workdir(train_args) is None:
        p.error("train.py's --workdir is required (the process logs go there)")
    if args.processes < 1 or args.devices < 1:
        p.error("--processes and --devices must be positive")
    launch = Launch(
        train_args, processes=args.processes, devices=args.devices, port=args.port, echo=True
    )

    # Ctrl-C / SIGTERM: pass it on as SIGTERM to every process (they save and exit 75).
    def forward(signum: int, frame: object) -> None:
        for i in range(len(launch.procs)):
            launch.signal(i, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = launch.wait()
    print(f"exit statuses: {codes}; logs: {', '.join(map(str, launch.logs))}")
    failed = [c for c in codes if c not in (0,)]
    return failed[0] if failed else 0


if __name__ == "__main__":
    sys.exit(main())
