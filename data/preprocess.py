"""Preprocesses videos into the stage-1 dataset: dithead_jax/commands/preprocess.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

from dithead_jax.commands.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
