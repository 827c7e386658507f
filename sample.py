"""Talking-head generation and evaluation with a trained DiT-Head run.

    python sample.py --workdir W --video V --audio A --out O.mp4 [--steps 50]
        [--reference x0_same_step|noisy_same_step|fixed|final] [--seed 0] [--side-by-side]
        [--guidance 1.0]
    python sample.py --workdir W --eval --dataset STAGE1 [--split test] [--max-clips N]
        [--steps 50] [--modes x0_same_step,...] [--guidance 1,2,3] [--synthetic DIR]
        --out REPORT_DIR
        [--coordinator_address HOST:PORT --num_processes N --process_id I]

W is a train.py DiT workdir; the VQGANs and audio features are found from it. Video mode
preprocesses V as data/preprocess.py does, drives it with A (V may be silent: its own sound is
never read; audio longer than the video loops the video back and forth; shorter audio trims
it), pastes each generated face back through its crop box with the soft lower-face mask and
writes O.mp4 with A as its sound.

--eval also runs as several processes (`jax.distributed`: the three flags on a bare launch,
or a cluster JAX detects): each process generates a contiguous share of the clips on its
own devices and writes their side-by-side videos; process 0 writes the one report, equal
to a one-process run's. Video mode is one process.

--guidance W: classifier-free guidance on audio (1 = off; W > 1 strengthens the audio),
for runs trained with a null audio context (diffusion.audio_dropout > 0). --eval takes a
comma-separated list and reports every reference mode at every scale.
"""

import argparse
import sys
from pathlib import Path

from dithead_jax.cli import (
    add_distributed_args,
    check_writable_dir,
    fail,
    initialize_distributed,
)

PROG = "sample.py"
MODES = ("x0_same_step", "noisy_same_step", "fixed", "final")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="train.py workdir of the DiT")
    p.add_argument("--video")
    p.add_argument("--audio")
    p.add_argument("--out", required=True, help="output mp4 (video mode) or report folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reference", default="x0_same_step", choices=MODES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side-by-side", action="store_true")
    p.add_argument("--landmarks", default="sidecar_or_dlib",
                   choices=["sidecar_or_dlib", "sidecar", "dlib", "face_alignment"])  # fmt: skip
    p.add_argument("--eval", action="store_true")
    p.add_argument("--dataset", help="stage-1 dataset to evaluate on")
    p.add_argument("--split", default="test")
    p.add_argument("--max-clips", type=int)
    p.add_argument("--max-frames", type=int)
    p.add_argument("--modes", default="x0_same_step", help="comma-separated reference modes")
    p.add_argument("--guidance", default="1", help="audio guidance scale(s), 1 = off")
    p.add_argument("--synthetic", help="data/synthetic.py folder: ground truth and speech")
    p.add_argument("--weights", help="folder of metric weights (sets $DITHEAD_WEIGHTS)")
    p.add_argument("--sync-expert", help="trained sync expert's workdir: LSE without "
                   "syncnet_v2 (default: <workdir>/../sync_expert if it exists)")  # fmt: skip
    p.add_argument("--metrics", default="lpips,fid,lse",
                   help="network metrics besides PSNR/SSIM ('' for none)")  # fmt: skip
    add_distributed_args(p)
    args = p.parse_args(argv)
    if args.steps < 1:
        fail(PROG, f"--steps must be >= 1 (got {args.steps})")
    args.guidance = parse_guidance(args.guidance, several=args.eval)
    if args.eval:
        if not args.dataset:
            fail(PROG, "--eval needs --dataset")
        bad = [m for m in args.modes.split(",") if m not in MODES]
        if bad:
            fail(PROG, f"unknown reference mode(s) {bad}; choose from {list(MODES)}")
        bad = [m for m in args.metrics.split(",") if m and m not in ("lpips", "fid", "lse")]
        if bad:
            fail(PROG, f"unknown metric(s) {bad}; choose from lpips, fid, lse")
    else:
        for flag in ("video", "audio"):
            path = getattr(args, flag)
            if not path:
                fail(PROG, f"--{flag} is required (or use --eval)")
            if not Path(path).is_file():
                fail(PROG, f"{path}: not found")
        if not args.out.endswith(".mp4"):
            fail(PROG, f"--out must be an .mp4 file (got {args.out})")
    return args


def parse_guidance(text: str, several: bool) -> tuple[float, ...]:
    """--guidance: finite scales >= 0 (0 = unconditional, 1 = off), one unless `several`."""
    import math

    try:
        scales = tuple(float(w) for w in text.split(","))
    except ValueError:
        fail(PROG, f"--guidance must be a number{' or a comma-separated list' * several} "
                   f"(got {text!r})")  # fmt: skip
    if not all(math.isfinite(w) and w >= 0 for w in scales):
        fail(PROG, f"--guidance scales must be finite and >= 0 (got {text!r})")
    if len(scales) > 1 and not several:
        fail(PROG, f"--guidance takes one scale in video mode (a list only with --eval): {text!r}")
    if len(set(scales)) != len(scales):
        fail(PROG, f"--guidance lists a scale twice: {text!r}")
    return scales


def dubbing_inputs(
    video: str, audio: str, landmarks: str, stage1: dict, size: int, audio_dim: int
) -> dict:
    """The face crops of `video` (preprocessed as the training set was: `stage1` is its
    provenance) and the speech of `audio` for video mode; bad input fails with one line.

    The speech comes from `audio` alone, so `video` may have no sound. Returns crops (the
    per-frame records of `process_video`), speech (N,) float32 at `rate`, cfg, featurizer.
    """
    import numpy as np

    from dithead_jax.config import DataConfig
    from dithead_jax.data.preprocess import (
        AudioFeaturizer,
        PreprocessConfig,
        SkipVideo,
        make_frame_landmarker,
        process_video,
    )
    from dithead_jax.data.video_io import MediaError, read_audio

    data = DataConfig(image_size=size, audio_dim=audio_dim)
    if landmarks == "sidecar_or_dlib":
        landmarks = "sidecar" if Path(video).with_suffix(".npz").is_file() else "dlib"
    # Crop exactly as the training set was cropped (datasets made before --margin: 0.35).
    margin = float(stage1.get("margin", PreprocessConfig.margin))
    cfg = PreprocessConfig(
        landmarks=landmarks, size=size, margin=margin, missing_face="drop_video", data=data
    )
    featurizer = AudioFeaturizer(stage1.get("audio_features", "logmel"), data)
    try:
        landmarker = make_frame_landmarker(cfg)
        chunks = list(process_video(Path(video), cfg, None, landmarker, with_audio=False))
    except (SkipVideo, MediaError) as e:
        fail(PROG, f"{video}: {e}")
    try:
        speech, rate = read_audio(audio, data.sample_rate)
    except MediaError as e:
        fail(PROG, str(e))  # names the audio file alone
    if len(speech) == 0:
        fail(PROG, f"{audio}: the audio stream holds no samples")
    crops = {k: np.concatenate([c[k] for _, c in chunks]) for k in chunks[0][1]}
    return dict(crops=crops, speech=speech, rate=rate, cfg=cfg, featurizer=featurizer)


def generate_video(args: argparse.Namespace, models) -> None:
    import numpy as np

    from dithead_jax.data import audio_features as af
    from dithead_jax.data.video_io import iter_frames_at_fps, write_video
    from dithead_jax.generation import frames_for_audio, paste_back, pingpong_indices
    from dithead_jax.sampling import generate_faces

    inputs = dubbing_inputs(
        args.video,
        args.audio,
        args.landmarks,
        models.latents.get("stage1_provenance", {}),
        int(models.latents["image_size"]),
        models.dit_run.model.audio_dim,
    )
    crops, speech, rate = inputs["crops"], inputs["speech"], inputs["rate"]
    data, featurizer = inputs["cfg"].data, inputs["featurizer"]
    count = frames_for_audio(len(crops["frame"]), len(speech), rate, data.fps)
    index = pingpong_indices(len(crops["frame"]), count)
    speech = af.peak_normalize(speech[: count * rate // data.fps])
    windows = af.audio_windows(featurizer(speech, count), data.audio_window)
    rng = np.random.default_rng(args.seed)
    reference = crops["frame"][rng.integers(len(crops["frame"]))]
    faces = generate_faces(
        models, crops["masked_frame"][index], windows, reference,
        steps=args.steps, mode=args.reference, seed=args.seed, guidance=args.guidance[0],
        landmarks=crops["landmarks"][index],
    )  # fmt: skip
    sources = list(iter_frames_at_fps(args.video, data.fps))
    out = []
    for k, i in enumerate(index):
        alpha = crops["mask"][i].astype(np.float32) / 255
        frame = paste_back(sources[crops["frame_index"][i]], faces[k], crops["crop_box"][i], alpha)
        out.append(np.concatenate([sources[crops["frame_index"][i]], frame], 1)
                   if args.side_by_side else frame)  # fmt: skip
    frames = np.stack(out)
    if frames.shape[1] % 2 or frames.shape[2] % 2:  # H.264 4:2:0 needs even sizes
        frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    write_video(args.out, frames, data.fps, speech, rate)
    print(f"wrote {args.out}: {len(frames)} frames, {args.steps} DDIM steps, {args.reference}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Before anything touches a device.
    initialize_distributed(PROG, args.coordinator_address, args.num_processes, args.process_id)
    import jax

    if not args.eval and jax.process_count() > 1:
        fail(PROG, "video mode runs as one process (only --eval splits work across processes)")
    if args.weights:  # the one documented place every weight lookup reads
        import os

        from dithead_jax.convert.weights import ENV_VAR

        os.environ[ENV_VAR] = str(Path(args.weights).expanduser().resolve())
    from dithead_jax.sampling import load_models

    try:
        models = load_models(args.workdir)
    except (FileNotFoundError, KeyError, ValueError) as e:
        fail(PROG, f"cannot load the run in {args.workdir}: {e}")
    from dithead_jax.sampling import check_guidance

    for w in args.guidance:
        try:
            check_guidance(models.dit_run, w)
        except ValueError as e:
            fail(PROG, f"--guidance: the run in {args.workdir}: {e}")
    if not args.eval:
        check_writable_dir(PROG, Path(args.out).parent)
        generate_video(args, models)
        return 0
    from dithead_jax.evaluation.evaluate import EvalOptions, evaluate
    from dithead_jax.evaluation.sync import find_expert

    options = EvalOptions(
        split=args.split,
        max_clips=args.max_clips,
        max_frames=args.max_frames,
        steps=args.steps,
        modes=tuple(args.modes.split(",")),
        seed=args.seed,
        synthetic=Path(args.synthetic) if args.synthetic else None,
        metrics=tuple(m for m in args.metrics.split(",") if m),
        guidance=args.guidance,
        sync_expert=Path(args.sync_expert) if args.sync_expert else find_expert(args.workdir),
    )
    out = check_writable_dir(PROG, args.out)
    try:
        report = evaluate(models, Path(args.dataset), out, options)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, str(e), code=1)
    if jax.process_index() != 0:
        return 0
    print(f"wrote {out / 'report.md'}: " + ", ".join(
        f"{k} {v:.4g}" for k, v in report["metrics"].items() if v is not None))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
