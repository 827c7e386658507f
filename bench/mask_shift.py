"""What a masked-latent variant costs, and whether encoding on the fly would be cheaper.

    python bench/mask_shift.py [--frames 64] [--time-encoder]

Prints one JSON object:
  mask_ms_per_variant        CPU time of one shifted lower-face mask + masked frame at 256^2
  em_forward_gflop           E_m (the paper's VQGAN f4 encoder, configs default) on one
                             256^2 frame, from XLA's compiled cost analysis
  em_ms_per_frame            (--time-encoder) its measured time per frame on this machine
  dit_l2_train_gflop_per_example   a DiT-L/2 train step on one 64x64x3 example (analytic,
                             `dit_step.dit_train_flops`, checked against XLA in bench/dit.py)
  em_share_of_dit_step       em_forward_gflop / dit_l2_train_gflop_per_example
  stage2_kib_per_variant_frame     on-disk KiB one more masked variant adds per frame
                             (zstd ArrayRecord shards; Gaussian float16 latents, which
                             compress worse than real ones: an upper bound)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def mask_cost(repeats: int = 20) -> float:
    from dithead_jax.config import DataConfig, SyntheticConfig
    from dithead_jax.data.masks import mask_shifts, shifted_masked_frames
    from dithead_jax.synthetic.dataset import render_synthetic_clip

    rendered, _, _ = render_synthetic_clip(SyntheticConfig(seconds=0.4, size=256), 0, 0)
    frame, landmarks = rendered.frames[0], rendered.landmarks[0]
    shifts = mask_shifts(repeats, 4.0, 0, (1, 2))
    start = time.perf_counter()
    shifted_masked_frames(frame, landmarks, shifts, DataConfig())
    return (time.perf_counter() - start) / repeats * 1e3


def encoder_cost(time_it: bool) -> tuple[float, float | None]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dithead_jax.config import VQGANConfig
    from dithead_jax.models.vqgan import VQGAN

    cfg = VQGANConfig()
    model = nnx.eval_shape(lambda: VQGAN(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    compiled = encode.lower(state, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gflop = float(cost["flops"]) / 1e9
    ms = None
    if time_it:
        real = VQGAN(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(real)
        batch = jnp.zeros((4, 256, 256, 3), jnp.float32)
        run = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
        run(params, batch).block_until_ready()
        start = time.perf_counter()
        run(params, batch).block_until_ready()
        ms = (time.perf_counter() - start) / 4 * 1e3
    return gflop, ms


def stage2_bytes(frames: int) -> float:
    from dithead_jax.data.records import DatasetWriter

    sizes = {}
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((frames, 64, 64, 3)).astype(np.float16)
    masked = rng.standard_normal((frames, 5, 64, 64, 3)).astype(np.float16)
    for k in (1, 5):
        with tempfile.TemporaryDirectory() as out:
            writer = DatasetWriter(out, "stage2", latent_shape=(64, 64, 3), num_masked=k)
            writer.write_video("train", "v", {
                "latent": latent, "masked_latents": masked[:, :k],
                "mask": np.zeros((frames, 64, 64), np.uint8),
                "audio": np.zeros((frames, 11, 33), np.float32)}, identity="i")  # fmt: skip
            sizes[k] = (Path(out) / "videos" / "v.array_record").stat().st_size
    return (sizes[5] - sizes[1]) / 4 / frames / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--time-encoder", action="store_true")
    args = parser.parse_args()
    from dithead_jax.config import DiTConfig
    from dithead_jax.training.dit_step import dit_train_flops

    gflop, ms = encoder_cost(args.time_encoder)
    dit = dit_train_flops(DiTConfig.L_2(), 1) / 1e9
    result = {
        "mask_ms_per_variant": round(mask_cost(), 2),
        "em_forward_gflop": round(gflop, 1),
        "em_ms_per_frame": None if ms is None else round(ms, 1),
        "dit_l2_train_gflop_per_example": round(dit, 1),
        "em_share_of_dit_step": round(gflop / dit, 4),
        "stage2_kib_per_variant_frame": round(stage2_bytes(args.frames), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
