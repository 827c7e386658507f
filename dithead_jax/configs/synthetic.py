"""Synthetic talking-face sets: `get_config("default" | "demo" | "testing")`.

Used by the demo and benchmarks; `data/synthetic.py` takes the same fields as flags.
"""

import ml_collections

VARIANTS = {
    # identities, clips per identity, seconds per clip, frame size
    "default": dict(identities=8, clips=4, seconds=8.0, size=256),
    "demo": dict(identities=4, clips=2, seconds=4.0, size=256),
    "testing": dict(identities=2, clips=1, seconds=1.0, size=64),
}


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {arg!r}; choose from {sorted(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.identities = VARIANTS[arg]["identities"]
    config.clips = VARIANTS[arg]["clips"]
    config.seconds = VARIANTS[arg]["seconds"]
    config.size = VARIANTS[arg]["size"]
    config.seed = 0
    config.fps = 25
    config.sample_rate = 16_000
    config.test_fraction = 0.25
    return config
