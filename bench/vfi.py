"""The frame interpolator on demo-size data: training speed, and held-out PSNR of the
interpolated middle frames against the two trivial answers.

    python bench/vfi.py --data STAGE1 [--workdir W] [--train] [--steps N]
        [--config configs/vfi.py:demo] [--split test] [--out bench/results/vfi.json]

--train runs train.py (the user's command, in a subprocess, wall-clock timed) into W first;
otherwise W must hold a trained run. Then every (p, p+1, p+2) triplet of --split (held-out
identities in data/preprocess.py's splits) is interpolated at t = 0.5 by the plain and the
EMA weights, and scored beside `repeat` (I0) and `average` ((I0 + I1) / 2)
(`vfi_train.held_out_psnr`). Prints one JSON object: the training figures read back from
W/metrics.jsonl (final loss, mean steps/s over the logged windows, which exclude the
compile) and the PSNRs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train(args: argparse.Namespace, workdir: Path) -> float:
    """Runs train.py into `workdir`; returns its wall time in seconds."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", args.config,
           "--workdir", str(workdir), f"--config.data.dir={args.data}",
           "--config.train.progress=none"]  # fmt: skip
    if args.steps:
        cmd.append(f"--config.train.num_steps={args.steps}")
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="stage-1 records (data/preprocess.py)")
    p.add_argument("--workdir", default=None, help="a trained run (or where --train puts one)")
    p.add_argument("--train", action="store_true", help="train into --workdir first")
    p.add_argument("--config", default="configs/vfi.py:demo")
    p.add_argument("--steps", type=int, default=0, help="override train.num_steps (0: keep)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.workdir is None and not args.train:
        p.error("--workdir names a trained run (or pass --train)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vfi_"))
    wall = train(args, workdir) if args.train else None

    import numpy as np

    from dithead_jax.training import vfi_train
    from dithead_jax.training.metrics import read_jsonl

    model, run = vfi_train.load_run(workdir)
    ema, _ = vfi_train.load_run(workdir, ema=True)
    started = time.perf_counter()
    scores = vfi_train.held_out_psnr(model, args.data, args.split, args.batch)
    scores["psnr_model_ema"] = vfi_train.held_out_psnr(ema, args.data, args.split, args.batch)[
        "psnr_model"
    ]
    logged = read_jsonl(workdir / "metrics.jsonl")
    last = max(logged)
    rates = [row["steps_per_sec"] for row in logged.values() if "steps_per_sec" in row]
    result = {
        "config": args.config,
        "workdir": str(workdir),
        "split": args.split,
        "train": {
            "steps": last,
            "batch": run.train.global_batch_size,
            "image_size": run.frame_size,
            "final_loss": logged[last]["loss"],
            "final_train_psnr": logged[last].get("psnr"),
            "steps_per_sec": float(np.mean(rates)) if rates else None,
            "wall_s": wall,
        },
        "eval": scores | {"eval_s": time.perf_counter() - started},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
