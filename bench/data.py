"""Benchmark the data path on this machine; prints one JSON line per measurement.

  python bench/data.py [--seconds 4] [--clips 2] [--size 256]

* preprocessing seconds per second of video, for sidecar+logmel and dlib+logmel;
* Grain pipeline samples/s for stage 1 (VQGAN images) and stage 2 (DiT latents), one
  process, against what a DiT-B/2 train step consumes here (batch 2 in 15.3 s, the
  PyTorch reference figure measured on this machine and recorded in DESIGN.md).
"""

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dithead_jax.config import DataConfig, SyntheticConfig  # noqa: E402
from dithead_jax.data.pipelines import dit_dataset, vqgan_dataset  # noqa: E402
from dithead_jax.data.preprocess import (  # noqa: E402
    AudioFeaturizer,
    PreprocessConfig,
    find_videos,
    make_frame_landmarker,
    preprocess_video,
)
from dithead_jax.data.records import DatasetWriter  # noqa: E402
from dithead_jax.synthetic.dataset import generate_dataset  # noqa: E402

DIT_B2_SECONDS_PER_SAMPLE = 15.3 / 2


def preprocess(videos: Path, out: Path, landmarks: str, size: int) -> dict:
    data = DataConfig(image_size=size)
    cfg = PreprocessConfig(landmarks=landmarks, size=size, data=data)
    writer = DatasetWriter(out, "stage1", image_size=size)
    featurizer, landmarker = AudioFeaturizer("logmel", data), make_frame_landmarker(cfg)
    start, frames = time.perf_counter(), 0
    for path in find_videos(videos):
        result = preprocess_video(
            path, videos, writer, lambda _: "train", cfg, featurizer, landmarker
        )
        frames += result.frames
    seconds = time.perf_counter() - start
    writer.finalize()
    video_seconds = frames / data.fps
    return {
        "bench": f"preprocess_{landmarks}_logmel",
        "size": size,
        "video_seconds": video_seconds,
        "seconds_per_video_second": round(seconds / video_seconds, 3),
        "ms_per_frame": round(1000 * seconds / frames, 2),
    }


def stage2_records(out: Path, videos: int = 4, frames: int = 150, variants: int = 4) -> Path:
    """Random latents in the stage-2 format (the pipeline's cost does not depend on values)."""
    writer = DatasetWriter(out, "stage2", latent_shape=(64, 64, 3), num_masked=variants)
    rng = np.random.default_rng(0)
    for v in range(videos):
        writer.write_video(
            "train",
            f"video{v}",
            {
                "latent": rng.standard_normal((frames, 64, 64, 3)).astype(np.float16),
                "masked_latents": rng.standard_normal((frames, variants, 64, 64, 3)).astype(
                    np.float16
                ),
                "mask": rng.integers(0, 256, (frames, 64, 64), dtype=np.uint8),
                "audio": rng.standard_normal((frames, 11, 33)).astype(np.float32),
            },
            identity=f"person{v}",
        )
    return writer.finalize()


def throughput(name: str, dataset, batch_size: int, batches: int = 30) -> dict:
    iterator = iter(dataset)
    next(iterator)  # warm-up: opens files, starts threads
    start = time.perf_counter()
    for _ in itertools.islice(iterator, batches):
        pass
    rate = batches * batch_size / (time.perf_counter() - start)
    result = {"bench": name, "batch_size": batch_size, "samples_per_s": round(rate, 1)}
    if name.startswith("pipeline_stage2"):
        needed = 1 / DIT_B2_SECONDS_PER_SAMPLE
        result["dit_b2_train_samples_per_s"] = round(needed, 3)
        result["ratio_to_dit_b2_demand"] = round(rate / needed, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        syn = SyntheticConfig(identities=args.clips, clips=1, seconds=args.seconds, size=256)
        generate_dataset(syn, tmp / "videos")
        for landmarks in ("sidecar", "dlib"):
            print(json.dumps(preprocess(tmp / "videos", tmp / landmarks, landmarks, args.size)))
        stage1 = tmp / "sidecar" / "dataset"
        for target in ("frames", "masked"):
            ds = vqgan_dataset(stage1, batch_size=8, target=target)
            print(json.dumps(throughput(f"pipeline_stage1_{target}", ds, 8)))
        stage2 = stage2_records(tmp / "stage2")
        print(json.dumps(throughput("pipeline_stage2", dit_dataset(stage2, batch_size=8), 8)))


if __name__ == "__main__":
    main()
