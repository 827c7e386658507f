"""Talking-head generation and evaluation with a trained DiT-Head run; see
dithead_jax/commands/sample.py (`dithead-sample`) and dithead_jax/pipeline.py."""

import sys

from dithead_jax.commands.sample import (  # noqa: F401  (tests and scripts use these)
    MODES,
    PROG,
    generate_video,
    main,
    parse,
    parse_guidance,
)

if __name__ == "__main__":
    sys.exit(main())
