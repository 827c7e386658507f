"""Benchmark: how fast synthetic talking faces render on this machine. Prints one JSON line.

    python bench/synthetic.py [--size 256] [--seconds 4] [--clips 2]

Times the three stages of one clip separately (speech synthesis, frame rendering, H.264+AAC
encoding) and reports the real-time factor (seconds of video per second of compute, one core).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dithead_jax.config import SyntheticConfig  # noqa: E402
from dithead_jax.data.video_io import write_video  # noqa: E402
from dithead_jax.synthetic.dataset import make_identity, num_frames  # noqa: E402
from dithead_jax.synthetic.render import render_clip  # noqa: E402
from dithead_jax.synthetic.speech import random_utterance, synthesize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clips", type=int, default=2)
    args = parser.parse_args()
    cfg = SyntheticConfig(identities=args.clips, clips=1, seconds=args.seconds, size=args.size)
    totals = {"speech_s": 0.0, "render_s": 0.0, "encode_s": 0.0}
    frames_total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.clips):
            ident = make_identity(cfg, i)
            rng = np.random.default_rng([cfg.seed, i, 0])
            t = num_frames(cfg)
            n = t * cfg.sample_rate // cfg.fps
            start = time.perf_counter()
            segments = random_utterance(rng, ident.voice, n, cfg.sample_rate)
            audio = synthesize(segments, ident.voice, cfg.sample_rate, rng)
            mid = time.perf_counter()
            clip = render_clip(ident, segments, t, cfg.fps, cfg.sample_rate, cfg.size, rng)
            end = time.perf_counter()
            write_video(Path(tmp) / f"{i}.mp4", clip.frames, cfg.fps, audio, cfg.sample_rate)
            totals["speech_s"] += mid - start
            totals["render_s"] += end - mid
            totals["encode_s"] += time.perf_counter() - end
            frames_total += t
    total = sum(totals.values())
    video_seconds = frames_total / cfg.fps
    print(
        json.dumps(
            {
                "bench": "synthetic_render",
                "size": cfg.size,
                "frames": frames_total,
                "video_seconds": video_seconds,
                "speech_ms_per_audio_second": round(1000 * totals["speech_s"] / video_seconds, 2),
                "render_ms_per_frame": round(1000 * totals["render_s"] / frames_total, 2),
                "encode_ms_per_frame": round(1000 * totals["encode_s"] / frames_total, 2),
                "total_ms_per_frame": round(1000 * total / frames_total, 2),
                "realtime_factor": round(video_seconds / total, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
