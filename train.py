"""Trains either stage of DiT-Head; see dithead_jax/commands/train.py (`dithead-train`)."""

import sys

from dithead_jax.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
