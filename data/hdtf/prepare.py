"""Cuts the downloaded HDTF videos into clips, one folder per identity.

    python data/hdtf/prepare.py --annotations HDTF/HDTF_dataset --raw RAW --out CLIPS [--workers N]

Writes CLIPS/<identity>/<SUBSET>_<video>_<index>.mp4. Re-running skips finished clips. Missing
raw videos are listed, not fatal. Exit status: 0 done, 1 no clip available or some clip
failed, 2 bad arguments or annotations.
"""

import argparse
import os
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dithead_jax.cli import check_writable_dir, fail  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", required=True, help="HDTF_dataset/ (or its repo)")
    parser.add_argument("--raw", required=True, help="downloaded videos: <SUBSET>/<video>.mp4")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--identities", help="file of identities to prepare (default: all)")
    parser.add_argument("--require-crop", action="store_true", help="skip clips without a crop")
    args = parser.parse_args(argv)
    prog = "prepare.py"
    if args.workers < 1:
        fail(prog, f"--workers must be >= 1 (got {args.workers})")
    if not Path(args.annotations).is_dir():
        fail(prog, f"--annotations {args.annotations} is not a folder")

    from dithead_jax.data.hdtf import AnnotationError, plan_clips, prepare_clips, read_identity_list

    try:
        wanted = read_identity_list(args.identities) if args.identities else None
        clips = plan_clips(
            args.annotations, args.raw, args.out, require_crop=args.require_crop, identities=wanted
        )
    except (AnnotationError, ValueError, OSError) as e:
        fail(prog, str(e))
    check_writable_dir(prog, args.out)
    summary = prepare_clips(clips, workers=args.workers)

    print(
        f"{len(clips)} clips planned: {len(summary.written)} written, {len(summary.skipped)} "
        f"already done, {summary.missing_clips} without a raw video, {len(summary.failed)} failed"
    )
    if summary.missing_raw:
        listing = " ".join(summary.missing_raw)
        print(f"missing raw videos ({len(summary.missing_raw)}) in {args.raw}:")
        print(textwrap.indent(textwrap.fill(listing, 96), "  "))
    if summary.short:
        print(f"shorter than annotated (download ends early?): {' '.join(summary.short)}")
    for name, message in sorted(summary.failed.items()):
        print(f"failed {name}: {message}", file=sys.stderr)
    if summary.available == 0:
        print(f"{prog}: error: no clip produced in {args.out}", file=sys.stderr)
        return 1
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
