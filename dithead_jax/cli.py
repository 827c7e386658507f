"""Small helpers shared by the command-line entry points: one-line errors, output checks."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
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
