"""Benchmark: peak memory of dubbing with sample.py (video mode) against video length.
Prints one JSON object.

    python bench/sample_memory.py [--steps 2] [--chunk-frames 64] [--cases 128:10,128:60,...]

Each case (crop size, seconds, frame size) dubs a synthetic talking head (a short rendered
clip looped back and forth to the length, landmarks in a sidecar) with a tiny random DiT
export (what is measured is memory, not quality), in a fresh `sample.py` process, whose
peak resident set (ru_maxrss) is reported with frames/s; then the 60 s / 10 s ratio per
crop size. Streaming keeps it flat: the ratio should be near 1 (the target is <= 1.5).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# crop size, seconds, (height, width) of the source video
CASES = {
    "128px_10s": (128, 10, (256, 256)),
    "128px_60s": (128, 60, (256, 256)),
    "256px_10s": (256, 10, (512, 512)),
    "256px_60s": (256, 60, (512, 512)),
    "256px_60s_720p": (256, 60, (720, 1280)),
}
BASE_SECONDS = 4.0  # rendered once per frame size, then looped (rendering is the slow part)


def tiny_models(size: int):
    """sampling.Models of untrained tiny networks for `size`^2 crops: the testing VQGAN
    (f4, with its middle attention, as the real one) and a one-block DiT of 64 tokens."""
    from flax import nnx

    from dithead_jax import config as cfg
    from dithead_jax.models.dit import DiT
    from dithead_jax.models.vqgan import VQGAN
    from dithead_jax.runs import DiTSpec
    from dithead_jax.sampling import Models

    latent = size // 4
    vq = cfg.VQGANConfig.testing(resolution=size)
    dit = cfg.DiTConfig.testing(input_size=latent, patch_size=max(2, latent // 8), depth=1)
    spec = DiTSpec(dit, cfg.DiffusionConfig(), cfg.DataConfig(image_size=size))
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    return Models(
        dit=DiT(dit, rngs=nnx.Rngs(0)), dit_run=spec,
        vqgan=VQGAN(vq, rngs=nnx.Rngs(1)), vqgan_masked=VQGAN(vq, rngs=nnx.Rngs(2)),
        latent_mean=zeros, latent_std=ones, masked_latent_mean=zeros, masked_latent_std=ones,
        latents={"image_size": size}, stage1={"margin": 0.3}, image_size=size,
    )  # fmt: skip


def write_export(models, out: Path) -> Path:
    """`models` as a folder `python -m dithead_jax.export` would write (sample.py --model)."""
    from dithead_jax import export

    for name in export.COMPONENTS:
        (out / name).mkdir(parents=True)
        config = (models.dit_run.to_json() if name == "dit"
                  else dataclasses.asdict(getattr(models, name).config))  # fmt: skip
        (out / name / export.CONFIG).write_text(json.dumps(config))
        export.save_params(getattr(models, name), out / name / export.WEIGHTS)
    stats = {k: np.asarray(getattr(models, k)).tolist() for k in export.STATISTICS}
    index = {
        "format": export.FORMAT,
        "image_size": models.image_size,
        "latents": {**stats, "image_size": models.image_size},
        "audio_features": {"name": "logmel", "spec": "logmel"},
        "stage1": dict(models.stage1),
    }
    (out / export.INDEX).write_text(json.dumps(index))
    return out


def write_talking_head(out: Path, seconds: float, height: int, width: int) -> Path:
    """A `seconds`-long talking head (height x width, the face centred), looped back and
    forth from a rendered clip, its speech looped alike; landmarks in `<out>.npz`."""
    from dithead_jax.config import SyntheticConfig
    from dithead_jax.data.video_io import VideoWriter
    from dithead_jax.generation import pingpong_indices
    from dithead_jax.synthetic.dataset import render_synthetic_clip

    side = min(height, width)
    syn = SyntheticConfig(identities=1, clips=1, seconds=BASE_SECONDS, size=side, seed=1)
    clip, speech, _ = render_synthetic_clip(syn, 0, 0)
    top, left = (height - side) // 2, (width - side) // 2
    count = round(seconds * syn.fps)
    index = pingpong_indices(len(clip.frames), count)
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[:] = clip.frames[0, :1, :1]  # the render's background colour at the corner
    per_frame = syn.sample_rate // syn.fps
    audio = np.concatenate([speech[i * per_frame : (i + 1) * per_frame] for i in index])
    with VideoWriter(out, syn.fps, audio, syn.sample_rate) as writer:
        for i in index:
            canvas[top : top + side, left : left + side] = clip.frames[i]
            writer.write(canvas)
    landmarks = clip.landmarks[index] + np.array([left, top], np.float32)
    np.savez(out.with_suffix(".npz"), landmarks=landmarks.astype(np.float32))
    return out


def run_case(model: Path, video: Path, out: Path, steps: int, chunk: int) -> dict:
    """sample.py in a fresh process: its peak RSS (the caller's only child) and speed."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dithead_jax.commands.sample", "--model", str(model),
         "--video", str(video), "--audio", str(video), "--out", str(out), "--steps",
         str(steps), "--landmarks", "sidecar", "--chunk-frames", str(chunk)],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"sample.py failed on {video}:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children
    frames = int(proc.stdout.split(": ")[1].split(" frames")[0])
    return {
        "peak_rss_gib": round(peak / 2**20, 3),
        "frames": frames,
        "wall_s": round(seconds, 1),
        "frames_per_s": round(frames / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk-frames", type=int, default=64)
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {list(CASES)}")
    args = parser.parse_args()
    names = args.cases.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in names:
            size, seconds, (height, width) = CASES[name]
            model = tmp / f"model{size}"
            if not model.exists():
                write_export(tiny_models(size), model)
            video = write_talking_head(tmp / f"{name}.mp4", seconds, height, width)
            results[name] = _measure(model, video, tmp / f"{name}_out.mp4", args)
            video.unlink()
    ratios = {
        f"{size}px_60s_over_10s": round(
            results[f"{size}px_60s"]["peak_rss_gib"] / results[f"{size}px_10s"]["peak_rss_gib"], 3
        )
        for size in (128, 256)
        if f"{size}px_60s" in results and f"{size}px_10s" in results
    }
    print(json.dumps({"bench": "sample_memory", "steps": args.steps,
                      "chunk_frames": args.chunk_frames, "cases": results,
                      "ratios": ratios}))  # fmt: skip


def _measure(model: Path, video: Path, out: Path, args) -> dict:
    """One case in a wrapper process whose only child is sample.py: RUSAGE_CHILDREN's
    ru_maxrss is a running maximum over all children, so each case needs a fresh parent."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from bench.sample_memory import run_case; from pathlib import Path; "
        "print(json.dumps(run_case(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), "
        "int(sys.argv[5]), int(sys.argv[6]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(model), str(video), str(out),
         str(args.steps), str(args.chunk_frames)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
