"""Benchmark FID on this machine; prints one JSON line per measurement.

    python bench/metrics_fid.py [--batch 8] [--batches 4] [--size 256] [--frechet-dim 0]

* Inception pool3 feature throughput (frames/s) from uint8 frames of --size, with the
  pytorch-fid protocol (resize to 299 included), one jitted program per batch; the compile
  time is reported separately. Real weights when found (else random, same cost).
* --frechet-dim D > 0: time of one Fréchet distance on D-dimensional statistics
  (FID uses 2048; scipy's sqrtm on 2048x2048 takes minutes on a busy 2-core CPU).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

from dithead_jax.convert.inception_weights import inception_from_file, resolve_fid_weights  # noqa: E402
from dithead_jax.evaluation.fid import FIDFeatureExtractor, frechet_distance  # noqa: E402
from dithead_jax.models.inception import FIDInceptionV3  # noqa: E402


def features(batch: int, batches: int, size: int) -> dict:
    try:
        path = resolve_fid_weights()
        model, weights = inception_from_file(path), str(path)
    except FileNotFoundError:
        model, weights = FIDInceptionV3(rngs=nnx.Rngs(0)), "random"
    extractor = FIDFeatureExtractor(model, "pytorch-fid", batch_size=batch)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (batch * batches, size, size, 3), dtype=np.uint8)
    start = time.perf_counter()
    extractor(frames[:batch])  # compile + first batch
    first = time.perf_counter() - start
    start = time.perf_counter()
    extractor(frames)
    seconds = time.perf_counter() - start
    return {
        "bench": "fid_features",
        "batch": batch,
        "frames": len(frames),
        "frame_size": size,
        "weights": weights,
        "first_batch_s": round(first, 2),
        "seconds": round(seconds, 2),
        "frames_per_s": round(len(frames) / seconds, 2),
        "cpus": os.cpu_count(),
    }


def frechet(dim: int) -> dict:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(dim, 2 * dim))
    b = rng.normal(size=(dim, 2 * dim))
    s1, s2 = a @ a.T / (2 * dim), b @ b.T / (2 * dim)
    start = time.perf_counter()
    value = frechet_distance(np.zeros(dim), s1, np.ones(dim), s2)
    return {
        "bench": "frechet_distance",
        "dim": dim,
        "seconds": round(time.perf_counter() - start, 2),
        "value": value,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frechet-dim", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(features(args.batch, args.batches, args.size)), flush=True)
    if args.frechet_dim > 0:
        print(json.dumps(frechet(args.frechet_dim)), flush=True)


if __name__ == "__main__":
    main()
