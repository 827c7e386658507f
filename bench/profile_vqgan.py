"""Where the VQGAN train step's time goes, against this machine's GEMM peak; one JSON object.

    python bench/profile_vqgan.py [--configs demo,f4_16384] [--batch N] [--steps 3]
        [--repeats 5] [--out /tmp/vqgan_profile] [--top 15] [--skip-convs]

What it measures (f32, compile excluded unless named, torch at 2 threads):
  gemm              the f32 GEMM peak (2048^3 jit matmul, best of 5): the yardstick.
  steps[config]     the trainer's own step (`vqgan_train.make_train_step`: generator loss,
                    its gradient, the discriminator's, AdamW, codebook upkeep, EMA, the
                    finite guard) on random weights and batches of the config's training
                    shape (batch, crop): compile seconds, XLA's FLOPs, best-of --repeats
                    seconds, fraction of the GEMM peak, and a jax.profiler trace of --steps
                    steps aggregated per XLA:CPU thunk (`profile_dit.trace_thunks`).
  convs             the 3x3 convolutions the step is made of (the demo's 32 / 64 channels
                    at 32^2 / 16^2 / 8^2, batch 8; and f4_16384's 128 channels at 256^2,
                    batch 1), forward and forward + backward, jax (NHWC) against torch
                    (channels_last), alternating: GFLOP/s and fraction of the GEMM peak.
                    What a conv of that shape can reach here bounds the step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profile_dit import trace_thunks  # noqa: E402

from dithead_jax import sharding  # noqa: E402
from dithead_jax.training import vqgan_train  # noqa: E402
from dithead_jax.training.metrics import cpu_model, measure_gemm_flops  # noqa: E402
from dithead_jax.training.state import create_train_state  # noqa: E402


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def step_profile(name: str, batch: int | None, args: argparse.Namespace, peak: float) -> dict:
    from configs import vqgan as vqgan_configs

    config = vqgan_configs.get_config(name)
    if batch:
        config.train.global_batch_size = batch
    run = vqgan_train.VQGANRun.from_config(config)
    n, size = run.train.global_batch_size, config.crop or run.model.resolution
    rules = sharding.VQGAN_RULES
    mesh = sharding.make_mesh("dp", jax.devices()[:1])
    state, setup = create_train_state(
        lambda r: vqgan_train.VQGANTrainer(run.model, run.loss, rngs=r),
        vqgan_train.make_optimizer(run),
        seed=0,
        mesh=mesh,
        rules=rules,
    )
    lpips_def, lpips_state = None, {}
    if run.use_lpips and run.loss.perceptual_weight:
        from dithead_jax.convert.lpips_weights import load_lpips
        from dithead_jax.models.lpips import LPIPS

        try:
            lpips = load_lpips()
        except FileNotFoundError:  # the work is the same with random VGG weights
            lpips = LPIPS(rngs=nnx.Rngs(0))
        lpips_def, lpips_state = nnx.split(lpips)
    rng = np.random.default_rng(0)
    batch_arrays = {"image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)}
    if run.loss.mask_weight:
        batch_arrays["mask"] = rng.uniform(0, 1, (n, size, size)).astype(np.float32)
    jitted = jax.jit(vqgan_train.make_train_step(setup, run, lpips_def), donate_argnums=0)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        started = time.perf_counter()
        compiled = jitted.lower(state, batch_arrays, lpips_state).compile()
        compile_s = time.perf_counter() - started
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch_arrays, lpips_state)
        return metrics

    jax.block_until_ready(run_step())
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        jax.block_until_ready(run_step())
        times.append(time.perf_counter() - started)
    flops, best = executed_flops(jitted, state, batch_arrays, lpips_state, mesh, run), min(times)
    hlo = compiled.as_text()
    out_dir = Path(args.out) / name
    return {
        "config": name,
        "batch": n,
        "size": size,
        "lpips": lpips_def is not None,
        "gan": run.loss.disc_start < run.train.num_steps,
        "compile_s": round(compile_s, 1),
        "xla_gflop_per_step_both_gan_branches": round(_flops(compiled) / 1e9, 2),
        "gflop_per_step": round(flops / 1e9, 2),
        "s_per_step": round(best, 4),
        "s_per_step_median": round(float(np.median(times)), 4),
        "gflop_per_s": round(flops / best / 1e9, 1),
        "fraction_of_gemm_peak": round(flops / best / peak, 3),
        "trace": trace_thunks(run_step, hlo, args.steps, out_dir, args.top),
    }


# The GAN's conditionals: the false branches run before disc_start.
IDLE_BRANCHES = ("no_gan", "discriminator_idle")


def executed_flops(jitted, state, batch, lpips_state, mesh, run) -> float:
    """XLA's FLOP count of the step as it runs at this config's steps: cost analysis counts
    every branch of a `lax.cond`, so the step is lowered once more (not run) with the GAN's
    conditionals resolved to the branch taken (the idle ones while step < disc_start)."""
    gan = run.loss.disc_start < run.train.num_steps
    real_cond = jax.lax.cond

    def resolved(pred, true_fn, false_fn, *operands):
        if getattr(false_fn, "__name__", "") in IDLE_BRANCHES:
            return (true_fn if gan else false_fn)(*operands)
        return real_cond(pred, true_fn, false_fn, *operands)

    jax.lax.cond = resolved
    try:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.VQGAN_RULES):
            # A new function: jit would reuse the trace cached for `jitted`'s.
            retraced = jax.jit(lambda *args: jitted.__wrapped__(*args))
            compiled = retraced.lower(state, batch, lpips_state).compile()
    finally:
        jax.lax.cond = real_cond
    return _flops(compiled)


# (name, batch, size, in channels, out channels): the 3x3 convs of the demo VQGAN (width
# 32, ch_mult (1, 2, 2), 32^2 windows, batch 8) and of f4_16384 at its first level.
CONV_SHAPES = (
    ("demo 32^2 32->32", 8, 32, 32, 32),
    ("demo 16^2 64->64", 8, 16, 64, 64),
    ("demo 8^2 64->64", 8, 8, 64, 64),
    ("f4_16384 256^2 128->128", 1, 256, 128, 128),
)


def conv_table(repeats: int, peak: float) -> list[dict]:
    import torch

    torch.set_num_threads(2)
    return [conv_row(*shape, repeats=repeats, peak=peak) for shape in CONV_SHAPES]


def conv_row(name: str, n: int, size: int, cin: int, cout: int, *, repeats: int, peak: float):
    """One 3x3 'SAME' conv, jax against torch, alternating (see the module doc)."""
    import torch

    flops = 2.0 * n * size * size * cin * cout * 9
    x = np.random.default_rng(0).normal(size=(n, size, size, cin)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(3, 3, cin, cout)).astype(np.float32) * 0.05

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    jax_fwd = jax.jit(conv)
    jax_bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    xg, wg = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, padding=1)

    def torch_bwd():
        (torch.nn.functional.conv2d(xg, wg, padding=1) ** 2).sum().backward()

    cands = {
        "jax_fwd": lambda: jax.block_until_ready(jax_fwd(xj, wj)),
        "torch_fwd": torch_fwd,
        "jax_fwd_bwd": lambda: jax.block_until_ready(jax_bwd(xj, wj)),
        "torch_fwd_bwd": torch_bwd,
    }
    best = {k: float("inf") for k in cands}
    for fn in cands.values():
        fn()  # compile / warm up
    for _ in range(repeats):  # alternating
        for key, fn in cands.items():
            started = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - started)
    row = {"conv": name, "gflop_fwd": round(flops / 1e9, 3)}
    for key, sec in best.items():
        work = flops * (3 if key.endswith("bwd") else 1)  # input and weight gradients
        row[f"{key}_gflop_per_s"] = round(work / sec / 1e9, 1)
        row[f"{key}_fraction_of_peak"] = round(work / sec / peak, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="demo", help="configs/vqgan.py variants")
    parser.add_argument("--batch", type=int, default=None, help="override the config's")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="/tmp/vqgan_profile")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--skip-convs", action="store_true")
    args = parser.parse_args()
    peak = measure_gemm_flops(n=2048, repeats=5)
    record = {"bench": "vqgan_profile", "jax": jax.__version__, "cpu": cpu_model(),
              "gemm_gflop_per_s": round(peak / 1e9, 1), "steps": {}}  # fmt: skip
    for name in filter(None, args.configs.split(",")):
        record["steps"][name] = step_profile(name, args.batch, args, peak)
    if not args.skip_convs:
        record["convs"] = conv_table(args.repeats, peak)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
