"""Solver / step-count / precision table on the demo's held-out clips; prints one JSON object.

  python bench/solver_table.py [--workdir demo/dit] [--stage1 demo/stage1]
      [--synthetic demo/synthetic] [--max-clips 4] [--max-frames 32] [--seeds 0,1]
      [--ref-seeds 0,1,2] [--out /tmp/solver_table] [--only ddim-10,...] [--plan]

Loads the DiT run once (`sampling.load_models`) and calls `evaluation.evaluate` in process
for every configuration x seed: split test, mode x0_same_step, guidance 1, metrics lpips
(plus the mouth-expert sync correlation the evaluation measures against the synthetic
set's truth). The seed changes the noise and each clip's reference frame, so the spread
between seeds is the run-to-run noise.

Configurations: DDIM at 250 / 100 / 50 / 25 / 10 steps; DPM-Solver++(2M) and UniPC at
25 / 15 / 10; DDIM-50 in bfloat16. DDIM-250 (the reference) runs at --ref-seeds.

Per run: sync (expert correlation with the true mouth opening), its shuffled-audio control,
PSNR (raw crop and inside the lower-face mask), LPIPS (raw crop and lower half of the
composite), flicker (mean over clips), s/frame (median over the generate_faces calls of
the run: each clip's own audio and its shuffled-audio control; compilation lands in one
call and so drops out of the median) and the run's wall time.

"Within noise" of DDIM-250: for each of sync, PSNR (lower face) and LPIPS (whole crop;
lower half with --lower-lpips),
|mean(config) - mean(DDIM-250)| <= max(range(config), range(DDIM-250)), range = max - min
over that config's seeds. The table names per solver the fewest steps meeting that on all
three.

Every run's result is appended to <out>/runs.jsonl as it finishes (a rerun skips the runs
found there), the summary goes to <out>/solver_table.json and the table to
<out>/solver_table.md. Each evaluate() writes into a temporary folder, deleted after the
report is read (side-by-side videos are off).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dithead_jax import sampling  # noqa: E402
from dithead_jax.evaluation import evaluate as ev  # noqa: E402

REFERENCE = "ddim-250"
# The within-noise rule's metrics; LPIPS is the whole raw crop's unless --lower-lpips.
TABLE_METRICS = ["sync", "psnr_lower", "lpips"]


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    solver: str
    steps: int
    dtype: str = "float32"


def configs() -> list[Config]:
    """Cheapest first, so a cut run still has every solver's low-step rows."""
    out = [Config(f"ddim-{s}", "ddim", s) for s in (10, 25)]
    for solver in ("dpmpp_2m", "unipc"):
        out += [Config(f"{solver}-{s}", solver, s) for s in (10, 15, 25)]
    out += [Config("ddim-50", "ddim", 50), Config("ddim-50-bf16", "ddim", 50, "bfloat16")]
    out += [Config(f"ddim-{s}", "ddim", s) for s in (100, 250)]
    return out


class Timer:
    """Wraps sampling.generate_faces (evaluate imports it per clip) and records s/frame.

    skip_control: the shuffled-audio control generation (evaluate's second call per clip,
    same masked frames, permuted audio) returns the clip's own-audio faces instead of
    sampling, halving the cost; only `sync_control` depends on it (then meaningless)."""

    def __init__(self, skip_control: bool = False):
        self.calls: list[float] = []
        self.inner = sampling.generate_faces
        self.skip_control = skip_control
        self.last = None  # (masked, audio, faces) of the previous call

    def __call__(self, models, masked_frames, audio, *args, **kwargs):
        last = self.last
        control = last is not None and last[0] is masked_frames
        if self.skip_control and control and not np.array_equal(last[1], audio):
            return last[2].copy()
        started = time.perf_counter()
        faces = self.inner(models, masked_frames, audio, *args, **kwargs)
        self.calls.append((time.perf_counter() - started) / len(masked_frames))
        self.last = (masked_frames, audio, faces)
        return faces


def cache_scorers(lower_lpips: bool) -> None:
    """The mouth expert (fit on training clips) and the LPIPS network are the same for
    every run: build each once instead of per evaluate() call. Without lower_lpips the
    lower-half LPIPS (`lpips_lower`) is not computed: XLA:CPU runs LPIPS on the 32x64
    lower halves ~6x slower than on the whole 64x64 crops (10.5 s against 1.7 s for 16
    frames here), which made it most of an evaluation's time."""
    ev.fit_mouth_expert = functools.lru_cache(maxsize=None)(ev.fit_mouth_expert)
    ev._lpips_scorer = functools.lru_cache(maxsize=None)(ev._lpips_scorer)
    if not lower_lpips:
        inner = ev.lower_face_scores
        ev.lower_face_scores = lambda real, fake, mask, lpips=None: inner(real, fake, mask)


def run_one(models, args, config: Config, seed: int, timer: Timer) -> dict:
    inference = sampling.InferenceOptions(
        steps=config.steps, mode="x0_same_step", solver=config.solver, dtype=config.dtype
    )
    options = ev.EvalOptions(
        split="test", max_clips=args.max_clips, max_frames=args.max_frames,
        steps=config.steps, modes=("x0_same_step",), seed=seed,
        synthetic=Path(args.synthetic), side_by_side=False, metrics=("lpips",),
        guidance=(1.0,), inference=inference,
    )  # fmt: skip
    out_dir = Path(tempfile.mkdtemp(prefix=f"solver_{config.name}_s{seed}_", dir=args.tmp))
    timer.calls.clear()
    timer.last = None
    started = time.perf_counter()
    try:
        report = ev.evaluate(models, Path(args.stage1), out_dir, options)
    finally:
        wall = time.perf_counter() - started
        shutil.rmtree(out_dir, ignore_errors=True)
    metrics, sync = report["metrics"], report.get("sync") or {}
    flick = [r["flicker"] for r in report["clips"]]
    return {
        "config": config.name, "solver": config.solver, "steps": config.steps,
        "dtype": config.dtype, "seed": seed, "control": not timer.skip_control,
        "sync": sync.get("correlation"), "sync_control": sync.get("control_correlation"),
        "expert_calibration": sync.get("expert_calibration"),
        "vqgan_ceiling": sync.get("vqgan_ceiling"),
        "psnr": metrics.get("psnr"), "psnr_lower": metrics.get("psnr_lower"),
        "psnr_composite": metrics.get("psnr_composite"), "ssim": metrics.get("ssim"),
        "lpips": metrics.get("lpips"), "lpips_lower": metrics.get("lpips_lower"),
        "flicker": float(np.nanmean(flick)) if flick else None,
        "s_per_frame": statistics.median(timer.calls) if timer.calls else None,
        "s_per_frame_calls": list(timer.calls),
        "wall_s": wall, "clips": report["settings"]["clips"],
        "frames": int(sum(r["frames"] for r in report["clips"])),
        "settings": report["settings"], "unavailable": report.get("unavailable"),
        "report_keys": sorted(report),
    }  # fmt: skip


SUMMARY_KEYS = ("sync", "sync_control", "psnr", "psnr_lower", "lpips", "lpips_lower",
                "flicker", "s_per_frame", "wall_s")  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    """Per config: mean, half-range and range over seeds of every summary key."""
    by_config: dict[str, list[dict]] = {}
    for r in runs:
        by_config.setdefault(r["config"], []).append(r)
    out = {}
    for name, rs in by_config.items():
        entry = {"solver": rs[0]["solver"], "steps": rs[0]["steps"], "dtype": rs[0]["dtype"],
                 "seeds": [r["seed"] for r in rs]}  # fmt: skip
        for key in SUMMARY_KEYS:
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                entry[key] = {
                    "mean": float(np.mean(values)),
                    "half_range": float((max(values) - min(values)) / 2),
                    "range": float(max(values) - min(values)),
                    "values": values,
                }
        out[name] = entry
    return out


def within_noise(summary: dict, name: str) -> dict[str, bool] | None:
    ref = summary.get(REFERENCE)
    row = summary[name]
    if ref is None or name == REFERENCE:
        return None
    verdict = {}
    for key in TABLE_METRICS:
        if key not in row or key not in ref:
            verdict[key] = False
            continue
        diff = abs(row[key]["mean"] - ref[key]["mean"])
        verdict[key] = diff <= max(row[key]["range"], ref[key]["range"])
    return verdict


def fewest_steps(summary: dict) -> dict[str, str | None]:
    """Per solver (float32 rows): the fewest steps within DDIM-250's noise on all three."""
    best: dict[str, str | None] = {}
    for name, row in sorted(summary.items(), key=lambda kv: kv[1]["steps"]):
        if row["dtype"] != "float32":
            continue
        best.setdefault(row["solver"], None)
        verdict = within_noise(summary, name)
        if best[row["solver"]] is None and verdict is not None and all(verdict.values()):
            best[row["solver"]] = name
    return best


def markdown(summary: dict, args, total_s: float) -> str:
    def cell(row, key, fmt):
        if key not in row:
            return "n/a"
        v = row[key]
        return f"{v['mean']:{fmt}} ± {v['half_range']:{fmt}}"

    order = sorted(summary, key=lambda n: (n.endswith("bf16"), summary[n]["solver"] != "ddim",
                                          summary[n]["solver"], -summary[n]["steps"]))  # fmt: skip
    best = fewest_steps(summary)
    lower = TABLE_METRICS[2] == "lpips_lower"
    lpips_what = "LPIPS on the lower half of the composite" if lower else "LPIPS on the whole crop"
    lines = [
        f"Demo DiT ({args.workdir}), split test, {args.max_clips} clips x {args.max_frames} "
        f"frames, x0_same_step, guidance 1, uniform spacing. Mean ± half-range over seeds "
        f"(seeds per row in the JSON). sync = mouth-expert correlation with the true mouth "
        f"opening; PSNR inside the lower-face mask; {lpips_what}; flicker = frame-to-frame "
        f"change in the mask over the real video's; s/frame = median seconds per generated "
        f"frame on this 2-core CPU (shared).",
        "",
        f"| config | steps | sync | PSNR lower (dB) | LPIPS{' lower' if lower else ''} "
        "| flicker | s/frame "
        "| within DDIM-250 noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        row = summary[name]
        verdict = within_noise(summary, name)
        if verdict is None:
            mark = "reference" if name == REFERENCE else "n/a"
        else:
            mark = (
                "yes"
                if all(verdict.values())
                else "no (" + ", ".join(k for k, ok in verdict.items() if not ok) + ")"
            )
        if best.get(row["solver"]) == name:
            mark += " **fewest**"
        label = f"{row['solver']}" + (" bf16" if row["dtype"] != "float32" else "")
        lines.append(
            f"| {label} | {row['steps']} | {cell(row, 'sync', '.3f')} "
            f"| {cell(row, 'psnr_lower', '.2f')} | {cell(row, TABLE_METRICS[2], '.4f')} "
            f"| {cell(row, 'flicker', '.3f')} | {cell(row, 's_per_frame', '.3f')} | {mark} |"
        )
    lines += [
        "",
        "Within noise: |mean - mean(DDIM-250)| <= max(range over seeds of either config) for "
        f"each of {', '.join(TABLE_METRICS)}.",
        "Fewest steps per solver within noise: "
        + ", ".join(f"{s}: {n or 'none'}" for s, n in best.items()),
        f"Total bench wall time: {total_s / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def convergence(models, args) -> dict:
    """Do the solvers converge to the same ODE solution? One test clip's first
    --convergence-frames frames, one seed and reference; per mode, the RMS distance of each
    (solver, steps) sample's latents (denormalised, before decoding) to DDIM at
    --convergence-ref steps. A correct second-order solver is closer than DDIM at equal
    steps and its distance falls faster with steps."""
    clip = next(ev.read_clips(Path(args.stage1), "test", 1, args.convergence_frames))
    reference = clip.frames[0]

    def latents(solver: str, steps: int, mode: str) -> np.ndarray:
        options = sampling.InferenceOptions(steps=steps, mode=mode, solver=solver)
        stream = sampling.FaceStream(models, reference, options=options, seed=0)
        stream.decode = lambda z: z  # keep the latents
        return np.asarray(stream(clip.masked, clip.audio, clip.landmarks), np.float64)

    out = {"clip": clip.video_id, "frames": len(clip.frames), "reference_steps":
           args.convergence_ref, "modes": {}}  # fmt: skip
    for mode in args.convergence_modes.split(","):
        started = time.perf_counter()
        ref = latents("ddim", args.convergence_ref, mode)
        scale = float(np.sqrt(np.mean(ref**2)))
        rows = {}
        for solver in ("ddim", "dpmpp_2m", "unipc"):
            for steps in (10, 15, 25, 50, 100):
                z = latents(solver, steps, mode)
                rows[f"{solver}-{steps}"] = float(np.sqrt(np.mean((z - ref) ** 2)))
        out["modes"][mode] = {"ref_rms": scale, "rms_to_ref": rows,
                              "seconds": time.perf_counter() - started}  # fmt: skip
        print(f"[solver_table] convergence {mode}: {json.dumps(out['modes'][mode])}",
              file=sys.stderr, flush=True)  # fmt: skip
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="demo/dit")
    p.add_argument("--stage1", default="demo/stage1")
    p.add_argument("--synthetic", default="demo/synthetic")
    p.add_argument("--max-clips", type=int, default=4)
    p.add_argument("--max-frames", type=int, default=32)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--ref-seeds", default="0,1,2", help="seeds of DDIM-250")
    p.add_argument("--only", default="", help="comma-separated config names")
    p.add_argument("--out", default="/tmp/solver_table")
    p.add_argument("--tmp", default=None, help="parent of the per-run temporary folders")
    p.add_argument("--plan", action="store_true", help="list the runs and exit")
    p.add_argument(
        "--lower-lpips",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also score LPIPS on the lower half (slow on CPU; the table then uses it)",
    )
    p.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample the shuffled-audio control (--no-control: skip it, halving the cost; "
        "sync_control is then meaningless)",
    )
    p.add_argument(
        "--convergence",
        action="store_true",
        help="instead of the table: each solver's distance to a many-step DDIM sample",
    )
    p.add_argument("--convergence-frames", type=int, default=8)
    p.add_argument("--convergence-ref", type=int, default=500)
    p.add_argument("--convergence-modes", default="fixed,x0_same_step")
    args = p.parse_args(argv)
    if args.convergence:
        models = sampling.load_models(args.workdir)
        result = convergence(models, args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "convergence.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    ref_seeds = [int(s) for s in args.ref_seeds.split(",")]
    only = set(filter(None, args.only.split(",")))
    chosen = [c for c in configs() if not only or c.name in only]
    # DDIM-250 right after the cheapest config (the reference every row needs), its extra
    # seeds last (they only widen its noise estimate).
    chosen.sort(key=lambda c: (c.name != configs()[0].name, c.name != REFERENCE))
    plan = [(c, s) for c in chosen for s in seeds]
    plan += [(c, s) for c in chosen if c.name == REFERENCE for s in ref_seeds if s not in seeds]
    if args.plan:
        print("\n".join(f"{c.name} seed {s}" for c, s in plan))
        return

    log = out / "runs.jsonl"
    done = []
    if log.is_file():
        done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    done_keys = {(r["config"], r["seed"], r.get("max_clips"), r.get("max_frames")) for r in done}

    started = time.perf_counter()
    t0 = time.perf_counter()
    models = sampling.load_models(args.workdir)
    print(f"[solver_table] loaded {args.workdir} in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    cache_scorers(args.lower_lpips)
    if args.lower_lpips:
        TABLE_METRICS[2] = "lpips_lower"
    timer = Timer(skip_control=not args.control)
    sampling.generate_faces = timer
    failures = []
    for config, seed in plan:
        if (config.name, seed, args.max_clips, args.max_frames) in done_keys:
            continue
        try:
            result = run_one(models, args, config, seed, timer)
        except Exception as e:  # report and go on: one solver's failure must not end the table
            import traceback

            failures.append({"config": config.name, "seed": seed,
                             "traceback": traceback.format_exc()})  # fmt: skip
            print(f"[solver_table] {config.name} seed {seed} FAILED: {e!r}", file=sys.stderr,
                  flush=True)  # fmt: skip
            traceback.print_exc()
            continue
        result |= {"max_clips": args.max_clips, "max_frames": args.max_frames}
        done.append(result)
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[solver_table] {config.name} seed {seed}: sync {result['sync']:.3f} "
              f"psnr_lower {result['psnr_lower']:.2f} lpips {result['lpips']:.4f} "
              f"flicker {result['flicker']:.3f} s/frame {result['s_per_frame']:.3f} "
              f"wall {result['wall_s']:.0f} s (elapsed {time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip

    runs = [r for r in done if (r.get("max_clips"), r.get("max_frames"))
            == (args.max_clips, args.max_frames)]  # fmt: skip
    for r in runs:  # without the control generation its correlation means nothing
        if r.get("control") is False:
            r["sync_control"] = None
    total = sum(r["wall_s"] for r in runs)
    summary = summarize(runs)
    result = {
        "settings": {
            "workdir": args.workdir,
            "split": "test",
            "max_clips": args.max_clips,
            "max_frames": args.max_frames,
            "mode": "x0_same_step",
            "guidance": 1.0,
            "spacing": "uniform",
            "metrics": ["lpips", "sync"],
        },  # fmt: skip
        "within_noise_rule": "|mean - mean(ddim-250)| <= max(range(config), range(ddim-250)) "
        f"over seeds, for {', '.join(TABLE_METRICS)}",
        "summary": summary,
        "within_noise": {n: within_noise(summary, n) for n in summary},
        "fewest_steps_within_noise": fewest_steps(summary),
        "runs": [
            {k: v for k, v in r.items() if k not in ("settings", "report_keys")} for r in runs
        ],  # fmt: skip
        "report_keys": runs[0]["report_keys"] if runs else None,
        "failures": failures,
        "total_eval_wall_s": total,
        "this_invocation_s": time.perf_counter() - started,
    }
    (out / "solver_table.json").write_text(json.dumps(result, indent=1))
    (out / "solver_table.md").write_text(markdown(summary, args, total))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
