"""Talking-head generation and evaluation with a trained DiT-Head run.

    python sample.py --model M --video V --audio A --out O.mp4 [--preset default|paper|fast]
        [--steps 50] [--solver ddim|dpmpp_2m|unipc] [--spacing uniform|leading|trailing]
        [--reference x0_same_step|noisy_same_step|fixed|final] [--seed 0] [--side-by-side]
        [--guidance 1.0] [--dtype float32|bfloat16] [--attention-impl xla|cudnn|splash|auto]
        [--max-batch 256] [--chunk-frames 64]
        [--interpolate off|double|smooth|half_rate] [--interpolator VFI_WORKDIR|flownet.pkl]
    python sample.py --model M --eval --dataset STAGE1 [--split test] [--max-clips N]
        [--preset ...] [--steps 50] [--solver ...] [--modes x0_same_step,...]
        [--guidance 1,2,3] [--synthetic DIR] --out REPORT_DIR
        [--coordinator_address HOST:PORT --num_processes N --process_id I]

--preset paper is DiT-Head's setting (250 DDIM steps, ADM's `ddim250` stride spacing, the
previous frame's noisy latent at the same step as reference); --preset fast the fewest
multistep-solver steps that matched DDIM-250 on the demo (README); flags given on top
override the preset. One clip runs on all of this process's devices (the sampler's slots
are split over them); --max-batch bounds the DiT rows per call and --chunk-frames the
frames per sampler call, so memory does not grow with the clip.

M is a train.py DiT workdir (the VQGANs and audio features are found from it) or a folder
`python -m dithead_jax.export` wrote; --workdir is the same flag. Video mode is
`DiTHeadPipeline` (dithead_jax/pipeline.py): it preprocesses V as data/preprocess.py does,
drives it with A (V may be silent: its own sound is
never read; audio longer than the video loops the video back and forth; shorter audio trims
it), pastes each generated face back through its crop box with the soft lower-face mask and
writes O.mp4 with A as its sound. Installed with pip, the same program is `dithead-sample`.

--eval also runs as several processes (`jax.distributed`: the three flags on a bare launch,
or a cluster JAX detects): each process generates a contiguous share of the clips on its
own devices and writes their side-by-side videos; process 0 writes the one report, equal
to a one-process run's. Video mode is one process.

--guidance W: classifier-free guidance on audio (1 = off; W > 1 strengthens the audio),
for runs trained with a null audio context (diffusion.audio_dropout > 0). --eval takes a
comma-separated list and reports every reference mode at every scale.

--interpolate (stage 3, RIFE's IFNet; dithead_jax/interpolation.py): `double` writes twice
the frame rate, `smooth` blends each generated face with its neighbours' interpolation
inside the mask, `half_rate` runs the DiT on every other frame and interpolates the rest;
--eval takes a list of off / smooth / half_rate and reports every mode under each.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from dithead_jax.cli import (
    add_distributed_args,
    check_writable_dir,
    fail,
    initialize_distributed,
)
from dithead_jax.interpolation import MODES as INTERPOLATE_MODES  # numpy only: no jax yet

PROG = "sample.py"
MODES = ("x0_same_step", "noisy_same_step", "fixed", "final")
SOLVERS = ("ddim", "dpmpp_2m", "unipc")
PRESETS = ("default", "paper", "fast")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", "--workdir", dest="model", required=True,
                   help="train.py workdir of the DiT, or an exported model folder")  # fmt: skip
    p.add_argument("--video")
    p.add_argument("--audio")
    p.add_argument("--out", required=True, help="output mp4 (video mode) or report folder")
    p.add_argument("--preset", default="default", choices=PRESETS,
                   help="paper: DiT-Head's 250 DDIM steps, ADM spacing, noisy_same_step; "
                        "fast: the fewest solver steps that matched DDIM-250 (README)")  # fmt: skip
    p.add_argument("--steps", type=int, help="sampling steps (default: the preset's, 50)")
    p.add_argument("--solver", choices=SOLVERS, help="default: the preset's (ddim)")
    p.add_argument("--spacing", choices=("uniform", "leading", "trailing"),
                   help="timestep spacing (default: the preset's, uniform)")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the DiT's compute dtype (weights stay as trained)")  # fmt: skip
    p.add_argument("--attention-impl", choices=("auto", "xla", "cudnn", "splash", "blockwise"),
                   help="override the run's attention kernel")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=256,
                   help="DiT rows per call: bounds memory whatever the clip length")  # fmt: skip
    p.add_argument("--reference", choices=MODES, help="default: the preset's (x0_same_step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side-by-side", action="store_true")
    p.add_argument("--chunk-frames", type=int,
                   help="video mode: frames generated, pasted back and encoded at a time "
                        "(default 64; memory grows with it, not with the video)")  # fmt: skip
    p.add_argument("--landmarks", default="sidecar_or_dlib",
                   choices=["sidecar_or_dlib", "sidecar", "dlib", "face_alignment"])  # fmt: skip
    p.add_argument(
        "--interpolate",
        default="off",
        help="frame interpolation after the DiT: off, double (2x fps), smooth, "
        "half_rate (DiT on every other frame); with --eval a comma-separated "
        "list of off / smooth / half_rate",
    )
    p.add_argument("--interpolator", help="a VFI workdir (train.py --config configs/vfi.py) "
                   "or a Practical-RIFE flownet.pkl (default: <workdir>/../vfi, else the "
                   "released rife_flownet.pkl from the weights folder)")  # fmt: skip
    p.add_argument("--eval", action="store_true")
    p.add_argument("--dataset", help="stage-1 dataset to evaluate on")
    p.add_argument("--split", default="test")
    p.add_argument("--max-clips", type=int)
    p.add_argument("--max-frames", type=int)
    p.add_argument("--modes", help="comma-separated reference modes (default: the preset's)")
    p.add_argument("--guidance", default="1", help="audio guidance scale(s), 1 = off")
    p.add_argument("--synthetic", help="data/synthetic.py folder: ground truth and speech")
    p.add_argument("--weights", help="folder of metric weights (sets $DITHEAD_WEIGHTS)")
    p.add_argument("--sync-expert", help="trained sync expert's workdir: LSE without "
                   "syncnet_v2 (default: <workdir>/../sync_expert if it exists)")  # fmt: skip
    p.add_argument("--metrics", default="lpips,fid,lse",
                   help="network metrics besides PSNR/SSIM ('' for none)")  # fmt: skip
    add_distributed_args(p)
    args = p.parse_args(argv)
    for flag in ("steps", "max_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail(PROG, f"--{flag.replace('_', '-')} must be >= 1 (got {value})")
    args.inference = inference_options(args)
    args.steps, args.reference = args.inference.steps, args.inference.mode
    args.modes = args.modes or args.reference
    if args.chunk_frames is not None and args.chunk_frames < 1:
        fail(PROG, f"--chunk-frames must be >= 1 (got {args.chunk_frames})")
    args.guidance = parse_guidance(args.guidance, several=args.eval)
    args.interpolate = tuple(args.interpolate.split(","))
    allowed = ("off", "smooth", "half_rate") if args.eval else INTERPOLATE_MODES
    bad = [m for m in args.interpolate if m not in allowed]
    if bad or (len(args.interpolate) > 1 and not args.eval):
        fail(PROG, f"--interpolate: {','.join(args.interpolate)} is not one of {list(allowed)}"
                   f"{' (a list only with --eval)' * (not bad)}")  # fmt: skip
    args.inference = dataclasses.replace(
        args.inference, interpolate=args.interpolate[0], interpolator=args.interpolator
    )
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


def inference_options(args: argparse.Namespace):
    """The preset's sampling options with the flags given on top of it."""
    from dithead_jax.sampling import InferenceOptions

    flags = dict(steps=args.steps, mode=args.reference, solver=args.solver,
                 spacing=args.spacing, dtype=args.dtype, attention_impl=args.attention_impl,
                 max_batch=args.max_batch)  # fmt: skip
    if args.chunk_frames is not None:
        flags["chunk_frames"] = args.chunk_frames
    return InferenceOptions.preset(args.preset, **{k: v for k, v in flags.items() if v is not None})


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


def generate_video(args: argparse.Namespace, models) -> None:
    """Streams: the video is read, dubbed and encoded --chunk-frames at a time, so memory
    does not grow with its length; a progress bar (frames/s, ETA) goes to stderr."""
    from dithead_jax.data.faces import NoFaceError
    from dithead_jax.pipeline import DiTHeadPipeline

    pipe = DiTHeadPipeline(models)
    try:
        frames = pipe.dub(
            args.video, args.audio, args.out, options=args.inference, seed=args.seed,
            guidance=args.guidance[0], landmarks=args.landmarks,
            side_by_side=args.side_by_side, progress=True,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, NoFaceError) as e:
        fail(PROG, str(e))
    o = args.inference
    vfi = f", interpolate {o.interpolate}" if o.interpolate != "off" else ""
    print(f"wrote {args.out}: {frames} frames, {o.steps} {o.solver} steps, {o.mode}, {o.dtype}"
          f"{vfi}")  # fmt: skip


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
    from dithead_jax import sampling

    try:
        models = sampling.load_models(args.model)
    except (FileNotFoundError, KeyError, ValueError) as e:
        fail(PROG, f"cannot load the run in {args.model}: {e}")
    for w in args.guidance:
        try:
            sampling.check_guidance(models.dit_run, w)
        except ValueError as e:
            fail(PROG, f"--guidance: the run in {args.model}: {e}")
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
        inference=args.inference,
        interpolate=args.interpolate,
        sync_expert=Path(args.sync_expert) if args.sync_expert else find_expert(args.model),
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
