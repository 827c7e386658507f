"""Benchmark LSE-D / LSE-C scoring on this machine; prints one JSON line.

  python bench/metrics_sync.py [--seconds 4] [--size 256] [--batch-size 20]

A random-weight SyncNet (no weights offline; the cost does not depend on the values)
scores a clip of 25 fps RGB face crops with 16 kHz audio. Reported: frames/s of the whole
`SyncScorer` call after one warm-up call (compilation excluded), and where the time goes.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dithead_jax.convert.syncnet_weights import (  # noqa: E402
    random_state_dict,
    syncnet_from_state_dict,
)
from dithead_jax.evaluation import sync  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=256, help="face crop side (resized to 224)")
    parser.add_argument("--batch-size", type=int, default=sync.BATCH_SIZE)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    num_frames = round(args.seconds * sync.FPS)
    frames = rng.integers(0, 256, (num_frames, args.size, args.size, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(num_frames * sync.SAMPLES_PER_FRAME)).astype(np.float32)
    model = syncnet_from_state_dict(random_state_dict(0))
    scorer = sync.SyncScorer(model, batch_size=args.batch_size)

    start = time.perf_counter()
    scorer(frames, audio)  # compiles the batch shape and the distance function
    warmup = time.perf_counter() - start

    start = time.perf_counter()
    result = scorer(frames, audio)
    total = time.perf_counter() - start

    start = time.perf_counter()
    sync.mfcc(sync.audio_to_int16(audio))
    mfcc_s = time.perf_counter() - start
    video, aud = sync.syncnet_embeddings(model, frames, audio, args.batch_size)
    start = time.perf_counter()
    np.asarray(sync.sync_distances(video, aud, vshift=sync.VSHIFT))
    dist_s = time.perf_counter() - start

    windows = result["num_windows"]
    print(
        json.dumps(
            {
                "bench": "lse_sync_scores",
                "device": jax.devices()[0].device_kind,
                "frames": num_frames,
                "windows": windows,
                "crop_size": args.size,
                "batch_size": args.batch_size,
                "frames_per_s": round(num_frames / total, 2),
                "windows_per_s": round(windows / total, 2),
                "seconds": round(total, 2),
                "warmup_seconds": round(warmup, 2),
                "mfcc_ms": round(1000 * mfcc_s, 1),
                "distances_ms": round(1000 * dist_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
