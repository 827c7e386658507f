"""Preprocess talking-head videos into the stage-1 dataset (face crops, masks, audio windows).

    python data/preprocess.py --input DIR --out DATASET
        [--landmarks face_alignment|dlib|sidecar] [--audio-features wav2vec2:PATH_OR_HUB_ID|logmel]
        [--size PX] [--workers N] [--num-shards N --shard-index I] [--test-identities FILE]

Every video under DIR (mp4/mov/mkv/avi/webm; `<identity>/<clip>.<ext>`) becomes one shard in
DATASET/videos/; finished videos are skipped on a re-run. The last step assembles
DATASET/dataset/, a TFDS ArrayRecord dataset (splits `train` and `test` by identity). With
--num-shards > 1 (a SLURM array, TPU hosts), each host takes every N-th video; run once more
with --finalize-only when all shards are done. Any file name works: one that is not plain ASCII
is stored under a safe id (an ASCII slug + 8 hex digits of its hash) and keeps its own name as
`source` in the video index. Bad videos are listed with their reason at the end; the exit
status is non-zero if no usable video exists.
Installed with pip, the same program is `dithead-preprocess`.
"""

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

from dithead_jax.cli import check_writable_dir, fail

PROG = "preprocess.py"
_worker: dict = {}


def test_identity_reader(input_dir: Path, list_file: str | None):
    """identity -> split. Default: the input's index.json (synthetic sets), else no test set."""
    if list_file:
        path = Path(list_file)
        if not path.is_file():
            fail(PROG, f"{path}: test identity list not found")
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        held_out = {line for line in lines if line}
    elif (input_dir / "index.json").is_file():
        held_out = set(json.loads((input_dir / "index.json").read_text())["splits"]["test"])
    else:
        held_out = set()
    return held_out


def _init_worker(args: argparse.Namespace, held_out: set) -> None:
    from dithead_jax.config import DataConfig
    from dithead_jax.data.preprocess import (
        AudioFeaturizer,
        PreprocessConfig,
        make_frame_landmarker,
    )
    from dithead_jax.data.records import DatasetWriter

    data = DataConfig(image_size=args.size, audio_dim=args.audio_dim)
    cfg = PreprocessConfig(
        landmarks=args.landmarks,
        audio_features=args.audio_features,
        size=args.size,
        margin=args.margin,
        missing_face=args.missing_face,
        data=data,
    )
    _worker.update(
        cfg=cfg,
        root=Path(args.input),
        featurizer=AudioFeaturizer(args.audio_features, data),
        landmarker=make_frame_landmarker(cfg),
        writer=DatasetWriter(
            args.out,
            "stage1",
            image_size=args.size,
            audio_window=data.audio_window,
            audio_dim=args.audio_dim,
            provenance=provenance(args),
        ),  # fmt: skip
        split_of=lambda identity: "test" if identity in held_out else "train",
    )


def provenance(args: argparse.Namespace) -> dict:
    """Recorded with the dataset: sample.py must compute the same audio features and crop
    the same way; `speech` tells readers each video's speech and path are kept (an older
    dataset lacks it, and extending one with this version is refused: mixed layouts)."""
    from dithead_jax.data.sources import SPEECH_LAYOUT

    return {
        "audio_features": args.audio_features,
        "landmarks": args.landmarks,
        "margin": args.margin,
        "speech": SPEECH_LAYOUT,
    }


def _process(path: Path):
    from dithead_jax.data.preprocess import preprocess_video

    w = _worker
    return preprocess_video(
        path, w["root"], w["writer"], w["split_of"], w["cfg"], w["featurizer"], w["landmarker"]
    )


def audio_dim_of(spec: str) -> int:
    """Feature width: 33 log-mel bands, or the Wav2Vec2 checkpoint's CTC vocabulary."""
    if spec == "logmel":
        return 33
    if not spec.startswith("wav2vec2:"):
        fail(PROG, f"--audio-features must be logmel or wav2vec2:PATH_OR_HUB_ID (got {spec!r})")
    from transformers import Wav2Vec2Config

    try:
        return Wav2Vec2Config.from_pretrained(spec.split(":", 1)[1]).vocab_size
    except (OSError, ValueError) as e:
        fail(PROG, f"cannot read the Wav2Vec2 config of {spec.split(':', 1)[1]}: {e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Preprocess talking-head videos.")
    parser.add_argument("--input", required=True, help="folder of <identity>/<clip> videos")
    parser.add_argument("--out", required=True, help="dataset folder to create or extend")
    parser.add_argument("--landmarks", default="face_alignment",
                        choices=["face_alignment", "dlib", "sidecar"])  # fmt: skip
    parser.add_argument("--audio-features", default="logmel",
                        help="logmel | wav2vec2:PATH_OR_HUB_ID")  # fmt: skip
    parser.add_argument("--size", type=int, default=256, help="face crop size in pixels")
    parser.add_argument("--margin", type=float, default=0.35,
                        help="crop side = (1 + 2 margin) x the landmarks' extent")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--test-identities", help="file with one held-out identity per line")
    parser.add_argument("--missing-face", default="drop_frames",
                        choices=["drop_frames", "drop_video"])  # fmt: skip
    parser.add_argument("--finalize-only", action="store_true")
    args = parser.parse_args(argv)

    input_dir = Path(args.input)
    if not input_dir.is_dir():
        fail(PROG, f"{input_dir}: input folder not found")
    if args.size < 32 or args.size % 2:
        fail(PROG, f"--size must be an even number >= 32 (got {args.size})")
    if not 0.0 <= args.margin <= 2.0:
        fail(PROG, f"--margin must be in [0, 2] (got {args.margin})")
    if args.workers < 1 or args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        fail(PROG, "need --workers >= 1 and 0 <= --shard-index < --num-shards")
    check_writable_dir(PROG, args.out)
    args.audio_dim = audio_dim_of(args.audio_features)
    held_out = test_identity_reader(input_dir, args.test_identities)

    from tqdm import tqdm

    from dithead_jax.data.preprocess import find_videos

    results = []
    if not args.finalize_only:
        videos = find_videos(input_dir)[args.shard_index :: args.num_shards]
        if not videos:
            fail(PROG, f"{input_dir}: no videos (mp4/mov/mkv/avi/webm) found", code=1)
        progress = dict(total=len(videos), desc="videos", unit="video")
        if args.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(args.workers, _init_worker, (args, held_out)) as pool:
                results = list(tqdm(pool.imap_unordered(_process, videos), **progress))
        else:
            _init_worker(args, held_out)
            results = [_process(v) for v in tqdm(videos, **progress)]

    from dithead_jax.data.records import DatasetWriter

    writer = DatasetWriter(
        args.out,
        "stage1",
        image_size=args.size,
        audio_dim=args.audio_dim,
        provenance=provenance(args),
    )  # fmt: skip  (re-open: validates that this run's parameters match the dataset's)
    written = [r for r in results if r.status == "written"]
    skipped = [r for r in results if r.status == "skipped"]
    existing = [r for r in results if r.status == "exists"]
    print(
        f"{len(written)} videos written ({sum(r.frames for r in written)} frames), "
        f"{len(existing)} already done, {len(skipped)} skipped"
    )
    for r in sorted(skipped, key=lambda r: r.path):
        print(f"  skipped {r.path}: {r.reason}")
    if not writer.finished_videos():
        print(f"{PROG}: error: no usable video in {args.out}", file=sys.stderr)
        return 1
    if args.num_shards > 1 and not args.finalize_only:
        print(f"shard {args.shard_index}/{args.num_shards} done; run --finalize-only when all are")
        return 0
    print(f"dataset: {writer.finalize()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
