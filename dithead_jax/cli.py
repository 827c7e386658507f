"""Small helpers shared by the command-line entry points: one-line errors, output checks."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from etils import epath

# Exit status of every entry point given bad flags, config or data (absl's usage errors
# and argparse use 2 as well).
EXIT_BAD_INPUT = 2


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Prints `prog: error: message` as one line on stderr and exits non-zero."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def check_writable_dir(prog: str, path: str | os.PathLike) -> Path:
    """Creates `path` if needed and proves it is writable, or fails with one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        fail(prog, f"cannot write to {path}: {e.strerror or e}")
    return path


def run_dir(prog: str, value: str | os.PathLike) -> epath.Path:
    """A run's --workdir as an `epath.Path`: a URL (gs://bucket/run) is kept as it is --
    Orbax and tensorboardX write there directly, and it cannot be probed without network --
    while a local path is created, checked writable and made absolute."""
    text = os.fspath(value)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(check_writable_dir(prog, text).resolve())


DISTRIBUTED_HELP = {
    "coordinator_address": "HOST:PORT of process 0's jax.distributed service (bare launches; "
    "leave unset on TPU pods, SLURM, MPI, Kubernetes: detected)",
    "num_processes": "Number of processes in a bare launch (with --coordinator_address).",
    "process_id": "This process's index in [0, num_processes) in a bare launch.",
}


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator_address / --num_processes / --process_id for argparse programs."""
    parser.add_argument("--coordinator_address", help=DISTRIBUTED_HELP["coordinator_address"])
    parser.add_argument("--num_processes", type=int, help=DISTRIBUTED_HELP["num_processes"])
    parser.add_argument("--process_id", type=int, help=DISTRIBUTED_HELP["process_id"])


def initialize_distributed(
    prog: str,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """`distributed.initialize` with bad flags reported as one line (see that module)."""
    from dithead_jax import distributed

    try:
        return distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as e:
        fail(prog, str(e))


def config_override_error(error: BaseException, argv: list[str]) -> str | None:
    """One line for an ml_collections `--config.a.b=...` override naming no field, or None
    for any other error. ml_collections raises a chained KeyError/AttributeError from inside
    absl's flag parsing (a page of traceback); its root KeyError holds the bad name."""
    chain, seen = [], error
    while seen is not None and len(chain) < 16:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    keys = [e.args[0] for e in chain if isinstance(e, KeyError) and e.args]
    plain = [k for k in keys if isinstance(k, str) and "\n" not in k and "'" not in k]
    if not isinstance(error, KeyError | AttributeError) or not plain:
        return None
    name = plain[-1]
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    flag = next((f for f in overrides if name in f[len("--config.") :].split(".")), None)
    where = f"{flag}: " if flag else ""
    message = f"{where}the config has no field {name!r}"
    hint = re.search(r'Did you mean "([^"]+)"', " ".join(str(k) for k in keys))
    if hint:
        return f"{message}; did you mean {hint.group(1)!r}?"
    return f"{message} (see the config file for the fields it defines)"
