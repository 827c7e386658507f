"""Renders synthetic talking faces whose mouths follow their speech exactly.

    python data/synthetic.py --out DIR --identities N --clips K --seconds S --seed X [--size PX]

Writes DIR/<identity>/<clip>.mp4 (H.264 25 fps + AAC speech), DIR/<identity>/<clip>.npz
(iBUG-68 landmarks, mouth opening, visemes, ...) and DIR/index.json (clips and a train/test
split by identity). Re-running with the same arguments skips clips that are already complete.
Installed with pip, the same program is `dithead-synthetic`.
"""

import argparse
import sys

from dithead_jax.cli import check_writable_dir, fail
from dithead_jax.config import SyntheticConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--identities", type=int, default=4, help="number of people")
    parser.add_argument("--clips", type=int, default=2, help="clips per person")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="frame size in pixels (even)")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held-out identities")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args(argv)
    prog = "synthetic.py"
    if args.identities < 1 or args.clips < 1:
        fail(prog, f"--identities and --clips must be >= 1 (got {args.identities}, {args.clips})")
    if not args.seconds > 0:
        fail(prog, f"--seconds must be > 0 (got {args.seconds})")
    if args.size < 64 or args.size % 2:
        fail(prog, f"--size must be an even number >= 64 (got {args.size})")
    if not 0 <= args.test_fraction < 1:
        fail(prog, f"--test-fraction must be in [0, 1) (got {args.test_fraction})")
    if args.workers < 1:
        fail(prog, f"--workers must be >= 1 (got {args.workers})")
    out = check_writable_dir(prog, args.out)

    from dithead_jax.synthetic.dataset import generate_dataset

    cfg = SyntheticConfig(
        identities=args.identities,
        clips=args.clips,
        seconds=args.seconds,
        size=args.size,
        seed=args.seed,
        test_fraction=args.test_fraction,
    )
    index = generate_dataset(cfg, out, workers=args.workers)
    splits = index["splits"]
    print(
        f"wrote {len(index['clips'])} clips of {len(index['identities'])} identities to {out} "
        f"(train: {', '.join(splits['train'])}; test: {', '.join(splits['test']) or 'none'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
