"""Encodes a stage-1 dataset with the trained VQGANs into the DiT's stage-2 latent records.

    python data/encode_latents.py --dataset STAGE1 --vqgan W1 --vqgan-masked W2 --out LATENTS
        [--mask-variants 4] [--batch 32]

W1 / W2 are the train.py workdirs of the frame VQGAN (E, D) and the masked-frame VQGAN
(E_m). Per frame: the pre-quantisation latent of the frame, K latents of the masked frame
with the mask moved by random offsets drawn per frame and variant (variant 0 unshifted; the
offsets are stored, and a re-run draws the same), the audio window, and DiffTalk's
upper-face landmarks. Latents are normalised per channel, E's and E_m's each with their own
statistics; the statistics and both VQGAN runs are recorded in the dataset (paths relative
to its metadata folder, LATENTS/dataset), so sample.py finds the decoder from a DiT run
alone, and a tree of runs and datasets still loads after it is moved. Resumable: finished
videos are skipped (a dataset from before per-frame offsets cannot be resumed: encode into
a new --out).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dithead_jax.cli import check_writable_dir, fail  # noqa: E402

PROG = "encode_latents.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Encode stage-1 records into stage-2 latents.")
    parser.add_argument("--dataset", required=True, help="stage-1 dataset (preprocess.py --out)")
    parser.add_argument("--vqgan", required=True, help="workdir of the frame VQGAN")
    parser.add_argument("--vqgan-masked", required=True, help="workdir of the masked VQGAN")
    parser.add_argument("--out", required=True, help="stage-2 dataset folder")
    parser.add_argument(
        "--mask-variants",
        type=int,
        default=4,
        help="masked latents per frame: the unshifted mask + K-1 random shifts",
    )
    parser.add_argument(
        "--max-shift",
        type=float,
        default=4.0,
        help="largest mask offset, pixels at 256^2 (scaled with the crop)",
    )
    parser.add_argument("--seed", type=int, default=0, help="statistics frames and offsets")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    stage1 = Path(args.dataset)
    if (
        not (stage1 / "dataset" / "metadata.json").is_file()
        and not (stage1 / "metadata.json").is_file()
    ):
        fail(PROG, f"{stage1}: not a stage-1 dataset (run data/preprocess.py first)")
    if args.mask_variants < 1 or args.batch < 1:
        fail(PROG, "--mask-variants and --batch must be >= 1")
    if not args.max_shift >= 0:
        fail(PROG, f"--max-shift must be >= 0 (got {args.max_shift})")
    out = check_writable_dir(PROG, args.out)

    from dithead_jax.data.latents import LatentJob, encode_dataset, make_encoder
    from dithead_jax.data.records import dataset_metadata
    from dithead_jax.runs import load_vqgan

    if dataset_metadata(stage1).get("kind") != "stage1":
        fail(PROG, f"{stage1}: not a stage-1 dataset")
    try:
        vqgan, vqgan_masked = load_vqgan(args.vqgan), load_vqgan(args.vqgan_masked)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, str(e))
    job = LatentJob(
        stage1=stage1,
        out=out,
        vqgan_workdir=args.vqgan,
        vqgan_masked_workdir=args.vqgan_masked,
        num_masked=args.mask_variants,
        max_shift_at_256=args.max_shift,
        seed=args.seed,
    )
    try:
        dataset = encode_dataset(
            job, make_encoder(vqgan, args.batch), make_encoder(vqgan_masked, args.batch)
        )
    except ValueError as e:
        fail(PROG, str(e), code=1)
    print(f"stage-2 dataset: {dataset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
