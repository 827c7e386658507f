"""Every test sees 8 simulated CPU devices, so sharded code runs as it would on a pod slice.

This must run before jax initialises its backends, which is why it lives in conftest.py and
only sets flags: nothing here imports jax.
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
