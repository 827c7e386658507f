"""Renders synthetic talking faces: dithead_jax/commands/synthetic.py (`--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

from dithead_jax.commands.synthetic import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
