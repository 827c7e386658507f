"""The main job end to end on one CPU, from nothing to an evaluated model (`make demo`).

    python demo.py [--out demo] [--fresh]

Runs the same commands a user runs, each in its own process, and times them:

    render      data/synthetic.py        talking faces with known speech and mouth opening
    preview     dithead_jax.data.preview contact sheet and a preview video } side by side
    preprocess  data/preprocess.py       crops, lower-face masks, audio windows }
    vqgan_frames train.py (vqgan)        E and D } side by side
    vqgan_masked train.py (vqgan)        E_m     }
    latents     data/encode_latents.py   stage-2 records
    dit         train.py (dit)           the denoiser
    evaluate    sample.py --eval         held-out identities: report, side-by-side videos,
                                         the reference modes compared        } side by side
    dub         sample.py --video        a held-out face, another one's speech }

Sizes are chosen for the 15-minute budget on two cores: 64^2 crops (16x16x3 latents), small
VQGANs and a 6-layer DiT (configs/*.py:demo). Every stage resumes where it stopped, and a
finished stage is skipped on the next run (--fresh starts over). Writes demo/timings.json
and demo/README.md (times per stage and the lip-sync verdict) next to the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from dithead_jax.cli import check_writable_dir, fail  # noqa: E402
from dithead_jax.data.video_io import atomic_path  # noqa: E402

PROG = "demo.py"
# The bar for "the model follows the audio" on held-out identities.
SYNC_TARGET, SYNC_MARGIN = 0.8, 0.5
MODES = "x0_same_step,noisy_same_step,fixed,final"


def held_out_pair(syn: Path) -> tuple[str, str]:
    """Two held-out identities of the rendered set (the face, and the voice that dubs it)."""
    index = json.loads((syn / "index.json").read_text())
    test = sorted({c["identity"] for c in index["clips"] if c["split"] == "test"})
    return test[0], test[-1]


def stages(out: Path, args: argparse.Namespace) -> list[list[tuple[str, Callable[[], list]]]]:
    """Groups of (name, command builder); the stages of a group run side by side."""
    syn, stage1, latents = out / "synthetic", out / "stage1", out / "latents"
    vq, vq_m, dit = out / "vqgan_frames", out / "vqgan_masked", out / "dit"

    def dub() -> list:
        face, voice = held_out_pair(syn)
        return ["sample.py", "--workdir", dit, "--video", syn / face / "clip000.mp4",
                "--audio", syn / voice / "clip000.mp4", "--steps", args.steps,
                "--side-by-side", "--out", out / f"dubbed_{face}_by_{voice}.mp4"]  # fmt: skip

    return [
        [("render", lambda: [
            "data/synthetic.py", "--out", syn, "--identities", args.identities, "--clips",
            args.clips, "--seconds", args.seconds, "--size", 128, "--seed", args.seed,
            "--workers", args.workers])],
        [("preview", lambda: ["-m", "dithead_jax.data.preview", "--dataset", syn, "--out", out]),
         ("preprocess", lambda: [
            "data/preprocess.py", "--input", syn, "--out", stage1, "--landmarks", "sidecar",
            "--size", 64, "--workers", args.workers])],
        # Small convolutions keep XLA:CPU from filling both cores, so the two VQGANs share
        # them (each also compiles while the other computes).
        [(f"vqgan_{target}", lambda workdir=workdir, target=target: [
            "train.py", "--config", "configs/vqgan.py:demo", "--workdir", workdir,
            f"--config.data.dir={stage1}", f"--config.target={target}",
            f"--config.train.num_steps={args.vqgan_steps}"])
         for target, workdir in (("frames", vq), ("masked", vq_m))],
        [("latents", lambda: [
            "data/encode_latents.py", "--dataset", stage1, "--vqgan", vq, "--vqgan-masked",
            vq_m, "--out", latents, "--mask-variants", 1])],
        [("dit", lambda: [
            "train.py", "--config", "configs/dit.py:demo", "--workdir", dit,
            f"--config.data.dir={latents}", f"--config.train.num_steps={args.dit_steps}"])],
        [("evaluate", lambda: [
            "sample.py", "--workdir", dit, "--eval", "--dataset", stage1, "--synthetic", syn,
            "--modes", MODES, "--steps", args.steps, "--max-clips", args.eval_clips,
            "--max-frames", args.eval_frames, "--metrics", "lpips", "--out",
            out / "report"]),
         ("dub", dub)],
    ]  # fmt: skip


def run_group(group: list, out: Path, env: dict[str, str]) -> dict[str, float]:
    """Runs the stages of a group side by side; their wall-clock seconds each."""
    started, running = time.perf_counter(), {}
    for name, build in group:
        command = [sys.executable, *map(str, build())]
        print(f"[demo] {name}: {' '.join(command[1:])}", flush=True)
        log = open(out / f"log_{name}.txt", "a")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        running[name] = (process, log)
    seconds, failed = {}, []
    while len(seconds) < len(running):
        for name, (process, log) in running.items():
            if name not in seconds and process.poll() is not None:
                log.close()
                seconds[name] = time.perf_counter() - started
                if process.returncode:
                    failed.append((name, process.returncode))
        time.sleep(0.2)
    for name, code in failed:
        text = (out / f"log_{name}.txt").read_text().strip().splitlines()
        fail(PROG, f"stage {name} failed (exit {code}, log {out / f'log_{name}.txt'}): "
                   f"{(text or ['(no output)'])[-1]}", 1)  # fmt: skip
    return seconds


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def summary(out: Path, timings: dict[str, float], groups: list[list[str]]) -> str:
    from dithead_jax.evaluation.report import markdown_table

    report = json.loads((out / "report" / "report.json").read_text())
    sync, modes = report.get("sync", {}), report.get("modes") or {}
    corr, control = sync.get("correlation", 0.0), sync.get("control_correlation", 0.0)
    scores = {m: (v["sync"], v["sync_control"]) for m, v in modes.items() if "sync" in v}
    scores = scores or {MODES.split(",")[0]: (corr, control)}
    met = [m for m, (c, k) in scores.items() if c >= SYNC_TARGET and c - k >= SYNC_MARGIN]
    best = max(scores, key=lambda m: scores[m][0] - scores[m][1])
    rows = [[" + ".join(g), " / ".join(f"{timings.get(n, 0):.0f}" for n in g)] for g in groups]
    rows.append(["**wall time** (stages joined by + ran side by side)",
                 f"{wall_time(timings, groups):.0f}"])  # fmt: skip
    lines = [
        "# Demo run",
        "",
        f"Lip sync on held-out identities ({next(iter(scores))} references, the sampler's "
        f"default): correlation **{corr:.3f}** between the mouth opening measured in "
        f"generated frames and the true opening (shuffled-audio control {control:.3f}); "
        f"widest margin over the control: {best}, {scores[best][0]:.3f} against "
        f"{scores[best][1]:.3f}. Target >= {SYNC_TARGET} and >= {SYNC_MARGIN} above the "
        f"control: **{'met by ' + ', '.join(met) if met else 'not met'}**. "
        f"The mouth expert reads real held-out frames at "
        f"{sync.get('expert_calibration', 0):.3f} and the frame VQGAN's round trips of them "
        f"at {sync.get('vqgan_ceiling', 0):.3f}: no sample can do better than the decoder.",
        "",
        markdown_table(["stage", "seconds"], rows),
        "",
    ]
    if modes:
        keys = list(next(iter(modes.values())))
        table = [[m, *(v[k] for k in keys)] for m, v in modes.items()]
        lines += [
            "Reference modes (flicker: frame-to-frame change in the mouth region, generated "
            "over real):",
            "",
            markdown_table(["reference mode", *keys], table),
            "",
        ]
    dubbed = sorted(p.name for p in out.glob("dubbed_*.mp4"))
    lines += [
        "Full report: [report/report.md](report/report.md); side-by-side videos (truth | "
        f"masked input | generated) in report/; {', '.join(dubbed) or 'no dubbed video'}: a "
        "held-out face driven by another held-out identity's speech. TensorBoard: "
        f"`tensorboard --logdir {out.name}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--fresh", action="store_true", help="delete --out and start over")
    p.add_argument("--identities", type=int, default=24, help="a quarter are held out")
    p.add_argument("--clips", type=int, default=1, help="clips per identity")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per clip")
    p.add_argument("--vqgan-steps", type=int, default=300)
    p.add_argument("--dit-steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps when sampling")
    p.add_argument("--eval-clips", type=int, default=4, help="held-out clips evaluated")
    p.add_argument("--eval-frames", type=int, default=32, help="frames per evaluated clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    check_writable_dir(PROG, out)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    # One compilation cache for all stages: evaluation and dubbing reuse what the
    # latents stage compiled for the encoders, and a resumed stage its own step.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"))
    plan = stages(out, args)
    groups = [[name for name, _ in group] for group in plan]
    for group in plan:
        names = [name for name, _ in group]
        if all(name in timings for name in names):
            print(f"[demo] {', '.join(names)}: done in an earlier run")
            continue
        timings.update(run_group(group, out, env))
        write_json(timings_path, timings)
        print(f"[demo] {', '.join(f'{n} {timings[n]:.0f} s' for n in names)} "
              f"(total {wall_time(timings, groups):.0f} s)", flush=True)  # fmt: skip
    text = summary(out, timings, groups)
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(text)
    print(text)
    return 0


def wall_time(timings: dict[str, float], groups: list[list[str]]) -> float:
    """Stages of a group overlap: the job's wall time adds up each group's longest."""
    return sum(max(timings.get(name, 0.0) for name in group) for group in groups)


if __name__ == "__main__":
    sys.exit(main())
