"""Frame interpolation after the DiT on held-out clips; one JSON object (and --out).

    python bench/interpolation.py --workdir demo/dit --dataset demo/stage1 \
        --synthetic demo/synthetic [--interpolator demo/vfi] [--seeds 0,1] [--clips 4] \
        [--frames 32] [--steps 10] [--guidance 2] [--out bench/results/interpolation.json]

1. `modes`: the evaluation (evaluation/evaluate.py, one process) of x0_same_step at
   --guidance under interpolate off / smooth / half_rate, per seed (the seed draws the
   reference frame, the audio shuffle of the control and the sampler's noise): jitter and
   flicker (generated over real), mouth sync and its shuffled-audio control, PSNR inside
   the lower-face mask, and s/frame (median over clips; the three run one after another on
   every clip, so they share the machine's state); `mean` over seeds and `spread`
   (max - min).
2. `double`: 2x the frame rate. No 50-fps truth exists, so the real clip is resampled to
   50 fps by the same interpolator and the generated one (off) is doubled like it: jitter
   and flicker of the doubled generated clip over the doubled real one, against the same
   ratios at 25 fps.
3. `cost`: the interpolator's milliseconds per frame pair on face crops and on whole
   frames of the source video's size (why smooth / half_rate work on crops).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = ("jitter", "flicker", "sync", "sync_control", "psnr_lower", "s_per_frame")
VFI_MODES = ("off", "smooth", "half_rate")


def evaluation(models, args, seed: int, out: Path) -> dict[str, dict[str, float]]:
    from dithead_jax.evaluation.evaluate import EvalOptions, evaluate
    from dithead_jax.sampling import InferenceOptions

    options = EvalOptions(
        max_clips=args.clips, max_frames=args.frames, steps=args.steps,
        modes=("x0_same_step",), seed=seed, synthetic=Path(args.synthetic),
        side_by_side=False, metrics=(), guidance=(args.guidance,),
        inference=InferenceOptions(interpolator=args.interpolator), interpolate=VFI_MODES,
    )  # fmt: skip
    report = evaluate(models, Path(args.dataset), out, options)
    return {name: {k: row.get(k) for k in KEYS} for name, row in report["modes"].items()}


def doubled(models, args) -> dict[str, float]:
    """Jitter / flicker at 25 fps and after doubling both clips (see the module doc)."""
    from dithead_jax.evaluation.evaluate import read_clips
    from dithead_jax.evaluation.temporal import flicker, jitter
    from dithead_jax.interpolation import FrameDoubler
    from dithead_jax.sampling import generate_faces, interpolator

    interp = interpolator(models, args.interpolator)
    ratios: dict[str, list[float]] = {k: [] for k in ("jitter", "flicker")}
    ratios |= {f"{k}_50fps": [] for k in ("jitter", "flicker")}
    for clip in read_clips(Path(args.dataset), "test", args.clips, args.frames):
        fake = generate_faces(models, clip.masked, clip.audio, clip.frames[0], steps=args.steps,
                              guidance=args.guidance, landmarks=clip.landmarks)  # fmt: skip
        real2, fake2 = FrameDoubler(interp).push(clip.frames), FrameDoubler(interp).push(fake)
        # The in-between frame's mask: the wider of its neighbours'.
        mask2 = np.repeat(clip.mask, 2, axis=0)[:-1]
        mask2[1::2] = np.maximum(clip.mask[:-1], clip.mask[1:])
        for name, fn in (("jitter", jitter), ("flicker", flicker)):
            ratios[name].append(fn(clip.frames, fake, clip.mask))
            ratios[f"{name}_50fps"].append(fn(real2, fake2, mask2))
    return {k: float(np.mean(v)) for k, v in ratios.items()}


def cost(models, args, frame_size: tuple[int, int]) -> dict[str, float]:
    from dithead_jax.sampling import interpolator

    interp = interpolator(models, args.interpolator)
    out = {}
    rng = np.random.default_rng(0)
    for name, (h, w) in (("crop", (models.image_size,) * 2), ("source_frame", frame_size)):
        a, b = (rng.integers(0, 256, (interp.batch, h, w, 3), np.uint8) for _ in range(2))
        interp(a, b)  # compile
        best = min(_timed(interp, a, b) for _ in range(3))
        out[f"{name}_{h}x{w}_ms_per_pair"] = round(1e3 * best / interp.batch, 2)
    return out


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a trained DiT run (or exported model)")
    p.add_argument("--dataset", required=True, help="its stage-1 dataset")
    p.add_argument("--synthetic", required=True, help="data/synthetic.py folder (truth)")
    p.add_argument("--interpolator", default=None, help="default: <workdir>/../vfi")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--source-size", default="128,128", help="H,W of a source frame")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from dithead_jax.sampling import load_models

    models = load_models(args.workdir)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            per_seed[seed] = evaluation(models, args, seed, Path(tmp) / f"seed{seed}")
    names = list(per_seed[seeds[0]])
    mean, spread = {}, {}
    for name in names:
        values = {k: [per_seed[s][name][k] for s in seeds] for k in KEYS}
        mean[name] = {k: float(np.mean(v)) for k, v in values.items() if None not in v}
        spread[name] = {k: float(np.ptp(v)) for k, v in values.items() if None not in v}
    h, w = (int(x) for x in args.source_size.split(","))
    from dithead_jax.sampling import interpolator

    record = {
        "bench": "interpolation",
        "workdir": args.workdir,
        "interpolator": interpolator(models, args.interpolator).source,
        "clips": args.clips, "frames": args.frames, "steps": args.steps,
        "guidance": args.guidance, "seeds": seeds,
        "modes": {str(s): v for s, v in per_seed.items()},
        "mean": mean,
        "spread": spread,
        "double": doubled(models, args),
        "cost": cost(models, args, (h, w)),
    }  # fmt: skip
    text = json.dumps(record, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
