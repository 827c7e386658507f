"""The run configs (ml_collections files), shipped inside the package.

A checkout reaches them as `configs/` too (a symlink at the repository root), so
`--config configs/dit.py:testing` and `from configs import dit` work there; an installed
entry point run from any folder finds the same files by name through
`with_shipped_configs` (`--config dit.py:testing` or `--config configs/dit.py:testing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def shipped_config(spec: str) -> str:
    """A `--config` value (`PATH[:ARG]`) whose PATH does not exist, but names one of these
    files (`dit.py` or `configs/dit.py`), becomes that file's absolute path; anything else
    is returned unchanged, so ml_collections reports a real missing file itself."""
    path, colon, arg = spec.partition(":")
    if not path or Path(path).exists():
        return spec
    relative = Path(path)
    if relative.is_absolute() or relative.parent not in (Path("."), Path("configs")):
        return spec
    shipped = CONFIG_DIR / relative.name
    return f"{shipped}{colon}{arg}" if shipped.is_file() else spec


def with_shipped_configs(argv: Sequence[str], flag: str = "config") -> list[str]:
    """`argv` with the value of `--<flag>` (either `--flag=V` or `--flag V`) passed through
    `shipped_config`; other arguments, including `--<flag>.field=...` overrides, unchanged."""
    out = list(argv)
    for i, arg in enumerate(out):
        for dashes in ("--", "-"):
            name = f"{dashes}{flag}"
            if arg.startswith(f"{name}="):
                out[i] = f"{name}={shipped_config(arg[len(name) + 1 :])}"
            elif arg == name and i + 1 < len(out):
                out[i + 1] = shipped_config(out[i + 1])
    return out
