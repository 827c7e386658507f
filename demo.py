"""The main job end to end on one CPU, from nothing to an evaluated model (`make demo`).

    python demo.py [--out demo] [--fresh]

Runs the same commands a user runs, each in its own process, and times them:

    render         data/synthetic.py        talking faces, known speech and mouth opening
    preview        dithead_jax.synthetic.preview contact sheet, preview video      } side by side
    preprocess     data/preprocess.py       crops, lower-face masks, audio     }
    vqgan_frames   train.py (vqgan)         E and D                            } side
    vqgan_masked   train.py (vqgan)         E_m                                } by
    sync_expert    train.py (sync_expert)   lip-sync expert for LSE-C/LSE-D    } side
    vfi            train.py (vfi)           the frame interpolator (RIFE IFNet)}
    latents        data/encode_latents.py   stage-2 records
    dit            train.py (dit)           the denoiser (mask weight, CFG)    } side
    dit_paper      train.py (dit)           the paper's recipe, to compare     } by side
    export         dithead_jax.export       the DiT run as one relocatable folder (model/)
    evaluate_paper sample.py --eval         its sync and LSE                   } side
    evaluate       sample.py --eval         held-out identities: report,       } by
                                            side-by-side videos, modes compared } side
    evaluate_vfi   sample.py --eval         interpolation smooth / half_rate   }
    dub            sample.py --model model  a held-out face, another's speech  }
                                            (interpolate smooth)

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
# noisy_same_step and final are left to the README's measurements (noisy references are
# never seen in training); the guided samples come first, the unguided beside them.
MODES = "x0_same_step,fixed"
# The paper's recipe on the same data and budget (plain MSE, no audio dropout): the row the
# demo's recipe is compared against (README "What strengthens lip sync").
PAPER_RECIPE = ("--config.diffusion.mask_weight=0", "--config.diffusion.audio_dropout=0",
                "--config.model.null_audio=False")  # fmt: skip


def held_out_pair(syn: Path) -> tuple[str, str]:
    """Two held-out identities of the rendered set (the face, and the voice that dubs it)."""
    index = json.loads((syn / "index.json").read_text())
    test = sorted({c["identity"] for c in index["clips"] if c["split"] == "test"})
    return test[0], test[-1]


def stages(out: Path, args: argparse.Namespace) -> list[list[tuple[str, Callable[[], list]]]]:
    """Groups of (name, command builder); the stages of a group run side by side."""
    syn, stage1, latents = out / "synthetic", out / "stage1", out / "latents"
    vq, vq_m, dit = out / "vqgan_frames", out / "vqgan_masked", out / "dit"
    expert = out / "sync_expert"  # sample.py finds it next to the DiT run
    vfi = out / "vfi"  # and the frame interpolator
    dit_paper = out / "dit_paper"  # the paper's recipe, for the comparison row
    model = out / "model"  # the exported DiT run: what a user copies elsewhere to dub with

    def dub() -> list:
        face, voice = held_out_pair(syn)
        return ["sample.py", "--model", model, "--video", syn / face / "clip000.mp4",
                "--audio", syn / voice / "clip000.mp4", "--steps", args.steps,
                "--guidance", args.guidance, "--interpolate", "smooth", "--interpolator", vfi,
                "--side-by-side", "--out", out / f"dubbed_{face}_by_{voice}.mp4"]  # fmt: skip

    return [
        [("render", lambda: [
            "data/synthetic.py", "--out", syn, "--identities", args.identities, "--clips",
            args.clips, "--seconds", args.seconds, "--size", 128, "--seed", args.seed,
            "--workers", args.workers])],
        [("preview", lambda: ["-m", "dithead_jax.synthetic.preview",
                              "--dataset", syn, "--out", out]),
         ("preprocess", lambda: [
            "data/preprocess.py", "--input", syn, "--out", stage1, "--landmarks", "sidecar",
            "--size", 64, "--workers", args.workers])],
        # Small convolutions keep XLA:CPU from filling both cores, so the two VQGANs share
        # them (each also compiles while the other computes).
        [*((f"vqgan_{target}", lambda workdir=workdir, target=target: [
            "train.py", "--config", "configs/vqgan.py:demo", "--workdir", workdir,
            f"--config.data.dir={stage1}", f"--config.target={target}",
            f"--config.train.num_steps={args.vqgan_steps}"])
           for target, workdir in (("frames", vq), ("masked", vq_m))),
         ("sync_expert", lambda: [
            "train.py", "--config", "configs/sync_expert.py:demo", "--workdir", expert,
            f"--config.data.dir={stage1}", f"--config.train.num_steps={args.expert_steps}"]),
         ("vfi", lambda: [
            "train.py", "--config", "configs/vfi.py:demo", "--workdir", vfi,
            f"--config.data.dir={stage1}", f"--config.train.num_steps={args.vfi_steps}"])],
        [("latents", lambda: [
            "data/encode_latents.py", "--dataset", stage1, "--vqgan", vq, "--vqgan-masked",
            vq_m, "--out", latents, "--mask-variants", 1])],
        [("dit", lambda: [
            "train.py", "--config", "configs/dit.py:demo", "--workdir", dit,
            f"--config.data.dir={latents}", f"--config.train.num_steps={args.dit_steps}"]),
         *([("dit_paper", lambda: [
            "train.py", "--config", "configs/dit.py:demo", "--workdir", dit_paper,
            f"--config.data.dir={latents}", f"--config.train.num_steps={args.dit_steps}",
            *PAPER_RECIPE])] if args.paper_row else [])],
        [("export", lambda: ["-m", "dithead_jax.export", "--workdir", dit, "--out", model])],
        [*([("evaluate_paper", lambda: [
            "sample.py", "--workdir", dit_paper, "--eval", "--dataset", stage1, "--synthetic",
            syn, "--modes", "x0_same_step", "--steps", args.steps, "--max-clips",
            args.eval_clips, "--max-frames", args.eval_frames, "--metrics", "lse",
            "--sync-expert", expert, "--out", out / "report_paper"])] if args.paper_row else []),
         ("evaluate", lambda: [
            "sample.py", "--workdir", dit, "--eval", "--dataset", stage1, "--synthetic", syn,
            "--modes", MODES, "--guidance", ",".join(dict.fromkeys((f"{args.guidance:g}", "1"))),
            "--steps", args.steps, "--max-clips", args.eval_clips,
            "--max-frames", args.eval_frames, "--metrics", "lpips,lse", "--out",
            out / "report"]),
         # The same clips, frames and seed as `evaluate`'s guided x0_same_step rows, with
         # the interpolator after the DiT (its `off` row is that one).
         ("evaluate_vfi", lambda: [
            "sample.py", "--workdir", dit, "--eval", "--dataset", stage1, "--synthetic", syn,
            "--modes", "x0_same_step", "--guidance", args.guidance, "--steps", args.steps,
            "--interpolate", "smooth,half_rate", "--max-clips", args.eval_clips,
            "--max-frames", args.eval_frames, "--metrics", "", "--out", out / "report_vfi"]),
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
        f"Lip sync on held-out identities ({next(iter(scores))} references; "
        f"the unguided rows are in the table below): correlation **{corr:.3f}** between the "
        f"mouth opening measured in generated frames and the true opening (shuffled-audio "
        f"control {control:.3f}); "
        f"widest margin over the control: {best}, {scores[best][0]:.3f} against "
        f"{scores[best][1]:.3f}. Target >= {SYNC_TARGET} and >= {SYNC_MARGIN} above the "
        f"control: **{'met by ' + ', '.join(met) if met else 'not met'}**. "
        f"The mouth expert reads real held-out frames at "
        f"{sync.get('expert_calibration', 0):.3f} and the frame VQGAN's round trips of them "
        f"at {sync.get('vqgan_ceiling', 0):.3f}: no sample can do better than the decoder.",
        "",
        fidelity(report),
        "",
        *recipes(out, report),
        *interpolation(out, report),
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
        "masked input | VQGAN round trip | generated) in report/; "
        f"{', '.join(dubbed) or 'no dubbed video'}: a "
        "held-out face driven by another held-out identity's speech, dubbed from the "
        f"exported model ({out.name}/model: copy it anywhere, then "
        f'`DiTHeadPipeline.from_pretrained("model")`). TensorBoard: '
        f"`tensorboard --logdir {out.name}`.",
        "",
    ]
    return "\n".join(lines)


def recipes(out: Path, report: dict) -> list[str]:
    """The demo's recipe against the paper's, trained side by side on the same data."""
    from dithead_jax.evaluation.report import markdown_table

    paper_json = out / "report_paper" / "report.json"
    if not paper_json.is_file():
        return []
    paper = json.loads(paper_json.read_text())
    rows = [["paper recipe (plain MSE), x0_same_step", paper.get("sync", {}), paper["metrics"]]]
    for name, mode in (report.get("modes") or {}).items():
        if name.startswith("x0_same_step"):
            rows.append([f"this demo's recipe, {name}", mode, mode])

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    table = []
    for label, sync, metrics in rows:
        corr = sync.get("correlation", sync.get("sync"))
        control = sync.get("control_correlation", sync.get("sync_control"))
        table.append([label, f"{cell(corr)} ({cell(control)})",
                      f"{cell(metrics.get('lse_c'))} / {cell(metrics.get('lse_d'))}",
                      cell(metrics.get("psnr_lower"))])  # fmt: skip
    header = ["recipe (same data, VQGANs and steps)", "sync (control)", "LSE-C / LSE-D",
              "PSNR lower face"]  # fmt: skip
    return [markdown_table(header, table), ""]


def interpolation(out: Path, report: dict) -> list[str]:
    """The interpolator after the DiT (report_vfi) against the same rows without it."""
    from dithead_jax.evaluation.report import markdown_table

    vfi_json = out / "report_vfi" / "report.json"
    if not vfi_json.is_file():
        return []
    modes = report.get("modes") or {}
    rows = {name: v for name, v in modes.items() if name.startswith("x0_same_step w=")}
    rows |= {n: v for n, v in (json.loads(vfi_json.read_text()).get("modes") or {}).items()}
    keys = ("jitter", "flicker", "sync", "psnr_lower", "s_per_frame")
    table = [[name, *(f"{v[k]:.3f}" if v.get(k) is not None else "n/a" for k in keys)]
             for name, v in rows.items()]  # fmt: skip
    return [
        "Frame interpolation after the DiT (the demo's interpolator; jitter: RMS second "
        "temporal difference in the mouth region, generated over real; flicker: first "
        "difference; `half_rate` runs the DiT on every other frame):",
        "",
        markdown_table(["rows", "jitter", "flicker", "sync", "PSNR lower face", "s/frame"], table),
        "",
    ]


def fidelity(report: dict) -> str:
    """The faces (round trip vs generated, lower face composited) and the expert's LSE."""
    metrics, trip = report.get("metrics", {}), report.get("round_trip", {})

    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    text = (
        f"Lower face, composited into the real crop (PSNR inside the mask): frame VQGAN "
        f"round trips {num(trip.get('psnr_lower'), '.1f')} dB, generated "
        f"{num(metrics.get('psnr_lower'), '.1f')} dB (whole generated crop "
        f"{num(metrics.get('psnr'), '.1f')} dB)."
    )
    if metrics.get("lse_c") is not None:
        expert = report.get("settings", {}).get("lse_expert", "syncnet_v2")
        text += (
            f" LSE-C {metrics['lse_c']:.3f}, LSE-D {metrics['lse_d']:.3f} ({expert}; a trained "
            "expert's numbers are on its own scale, not SyncNet's)."
        )
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--fresh", action="store_true", help="delete --out and start over")
    p.add_argument("--identities", type=int, default=24, help="a quarter are held out")
    p.add_argument("--clips", type=int, default=1, help="clips per identity")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per clip")
    p.add_argument("--vqgan-steps", type=int, default=300)
    p.add_argument("--expert-steps", type=int, default=300, help="sync expert (LSE) steps")
    p.add_argument("--dit-steps", type=int, default=1000)
    p.add_argument("--vfi-steps", type=int, default=300, help="frame interpolator steps")
    p.add_argument("--paper-row", action=argparse.BooleanOptionalAction, default=True,
                   help="also train and score the paper's recipe, side by side")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="DDIM steps when sampling")
    p.add_argument("--guidance", type=float, default=2.0, help="audio guidance scale (1 = off)")
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
