"""Sync expert on demo-size data: steps/s, and held-out accuracy against training steps.

    python bench/sync_expert.py --data STAGE1 [--workdir W] [--steps 300] [--every 50]
        [--config configs/sync_expert.py:demo] [--out bench/results/sync_expert.json]

Trains through train.py's path (`sync_expert_train.build_task` + the shared loop) in
chunks of --every steps, resuming from W each time, and after each chunk scores the
checkpoint on the *test* split (held-out identities): `offset_accuracy` (own audio beats
the same clip's audio 2..15 frames off) and `accuracy` (top-1 among the batch's audio +
the shifted one). Prints one JSON line per chunk, then the whole set.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="stage-1 records (data/preprocess.py)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--config", default="configs/sync_expert.py:demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    flags.FLAGS.mark_as_parsed()

    import importlib.util

    from ml_collections import config_flags  # noqa: F401 -- loads configs like train.py

    from dithead_jax.training import loop, sync_expert_train

    path, _, variant = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("sync_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant or "demo")
    config.data.dir = args.data
    config.train.progress = "none"
    config.train.checkpoint_every = args.every
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sync_expert_"))
    rows = []
    for target in range(args.every, args.steps + 1, args.every):
        config.train.num_steps = target
        run = sync_expert_train.SyncExpertRun.from_config(config)
        started = time.perf_counter()
        task = sync_expert_train.build_task(config)
        built = time.perf_counter()
        result = loop.run(task, run.train, workdir)
        trained = time.perf_counter()
        model, run = sync_expert_train.load_expert(workdir)
        scores = sync_expert_train.held_out_accuracy(model, run, "test")
        row = {
            "step": target,
            "build_s": round(built - started, 2),
            "train_s": round(trained - built, 2),
            "steps_per_s": round((result.final_step - result.start_step) / (trained - built), 2),
            "train_loss": round(result.losses[max(result.losses)], 4),
            "held_out": {k: round(v, 4) for k, v in scores.items()},
            "eval_s": round(time.perf_counter() - trained, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {"config": args.config, "data": args.data, "workdir": str(workdir), "rows": rows}
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
