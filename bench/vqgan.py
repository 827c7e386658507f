"""Benchmark the stage-1 VQGAN on this machine; prints one JSON line per measurement.

  python bench/vqgan.py [--config f4_16384] [--batch 1] [--train-batch 1] [--repeats 2]

* encode and decode frames/s (jit, compile excluded) at the config's resolution;
* one full train step (generator loss with LPIPS + adaptive GAN weight, its gradient and
  Adam update, then the discriminator's hinge loss, gradient and update): seconds and
  GFLOP/s, with FLOPs from XLA's cost analysis of the compiled step.
Weights are random (values do not change the work); LPIPS is the pretrained one if
`load_lpips()` finds it, else random.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dithead_jax.config import VQGANConfig, VQGANLossConfig  # noqa: E402
from dithead_jax.convert.lpips_weights import load_lpips  # noqa: E402
from dithead_jax.models.layers import count_params  # noqa: E402
from dithead_jax.models.lpips import LPIPS  # noqa: E402
from dithead_jax.models.vqgan import VQGAN  # noqa: E402
from dithead_jax.training import vqgan_losses as losses  # noqa: E402


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def _timed(fn, args, repeats: int) -> tuple[float, float, jax.stages.Compiled]:
    """(compile seconds, best seconds per call, the compiled fn) of jax.jit(fn) on args."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return compile_s, best, compiled


def _init(make, seed: int):
    """Params of `make(rngs)` built inside one jit (rbg keys: the values do not matter)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param)
    rngs = lambda: nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))
    params = jax.jit(lambda: nnx.split(make(rngs()), nnx.Param)[1])()
    return graphdef, params


def bench_codec(
    name: str, cfg: VQGANConfig, graphdef, params, batch: int, repeats: int
) -> list[dict]:
    size = cfg.resolution
    x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)
    encode = lambda p, x: nnx.merge(graphdef, p).encode(x)
    compile_s, seconds, compiled = _timed(encode, (params, x), repeats)
    z = compiled(params, x)
    out = [
        {
            "bench": "vqgan_encode",
            "frames_per_s": round(batch / seconds, 3),
            "seconds_per_call": round(seconds, 3),
            "gflops_per_frame": round(_flops(compiled) / batch / 1e9, 1),
            "compile_s": round(compile_s, 1),
        }
    ]
    decode = lambda p, z: nnx.merge(graphdef, p).decode(z)
    compile_s, seconds, compiled = _timed(decode, (params, z), repeats)
    out.append(
        {
            "bench": "vqgan_decode",
            "frames_per_s": round(batch / seconds, 3),
            "seconds_per_call": round(seconds, 3),
            "gflops_per_frame": round(_flops(compiled) / batch / 1e9, 1),
            "compile_s": round(compile_s, 1),
        }
    )
    for row in out:
        row.update(config=name, size=size, batch=batch)
    return out


def bench_train_step(
    name: str, cfg: VQGANConfig, graphdef, params, batch: int, repeats: int
) -> dict:
    loss_cfg = VQGANLossConfig()  # disc_start 0: the GAN branch and adaptive weight run
    dgraph, dparams = _init(lambda r: losses.discriminator_model(loss_cfg, rngs=r), 1)
    try:
        lpips, lpips_kind = load_lpips(), "pretrained"
    except FileNotFoundError:
        lpips, lpips_kind = LPIPS(rngs=nnx.Rngs(0)), "random"
    tx = losses.optimizer(loss_cfg, batch)
    size = cfg.resolution
    images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)

    def step(params, dparams, opt, dopt, images):
        def gen_loss(p):
            model, disc = nnx.merge(graphdef, p), nnx.merge(dgraph, dparams)
            return losses.vqgan_generator_loss(model, disc, lpips, images, 1, loss_cfg)

        (loss, aux), grads = jax.value_and_grad(gen_loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        disc_loss = lambda d: losses.discriminator_loss(
            nnx.merge(dgraph, d), images, aux["reconstructions"], 1, loss_cfg
        )[0]
        dloss, dgrads = jax.value_and_grad(disc_loss)(dparams)
        dupdates, dopt = tx.update(dgrads, dopt, dparams)
        return params, optax.apply_updates(dparams, dupdates), loss, dloss

    state = (params, dparams, tx.init(params), tx.init(dparams), images)
    compile_s, seconds, compiled = _timed(step, state, repeats)
    flops = _flops(compiled)
    return {
        "bench": "vqgan_train_step",
        "config": name,
        "size": size,
        "batch": batch,
        "seconds_per_step": round(seconds, 2),
        "gflop_per_step": round(flops / 1e9, 1),
        "gflops_per_s": round(flops / seconds / 1e9, 1),
        "lpips": lpips_kind,
        "disc_params": sum(x.size for x in jax.tree.leaves(dparams)),
        "compile_s": round(compile_s, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="f4_16384")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls (best of)")
    parser.add_argument("--train-repeats", type=int, default=1)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    cfg = getattr(VQGANConfig, args.config)()
    graphdef, params = _init(lambda r: VQGAN(cfg, rngs=r), 0)
    print(
        json.dumps(
            {
                "bench": "vqgan_params",
                "config": args.config,
                "params": count_params(nnx.merge(graphdef, params)),
                "device": jax.devices()[0].device_kind,
            }
        ),
        flush=True,
    )
    for row in bench_codec(args.config, cfg, graphdef, params, args.batch, args.repeats):
        print(json.dumps(row), flush=True)
    if not args.skip_train:
        print(
            json.dumps(
                bench_train_step(
                    args.config, cfg, graphdef, params, args.train_batch, args.train_repeats
                )
            )
        )
