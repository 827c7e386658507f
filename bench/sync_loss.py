"""Cost of the sync loss on the DiT's train step: compiled FLOPs and step time, with and
without, on the demo configs (configs/dit.py:demo, its frame VQGAN configs/vqgan.py:demo,
the expert configs/sync_expert.py:demo), one process, random weights and batches (the cost
does not depend on them; every frame is decoded and judged whatever its t, the gate only
masks).

    python bench/sync_loss.py [--batch 20] [--steps 10] [--rounds 5] [--out FILE.json]

--batch must be a multiple of 5 (runs of 5 frames). The two steps run alternately, rounds
x steps each, after warm-up; printed as one JSON object: per variant the XLA cost analysis
FLOPs per step and the median seconds per step over rounds.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.batch % 5:
        raise SystemExit(f"bench/sync_loss.py: --batch must be a multiple of 5, got {args.batch}")

    from configs import dit as dit_configs
    from configs import sync_expert as expert_configs
    from configs import vqgan as vqgan_configs
    from dithead_jax import config as cfg
    from dithead_jax import sharding
    from dithead_jax.diffusion import schedule as diffusion
    from dithead_jax.models.dit import DiT
    from dithead_jax.models.vqgan import VQGAN
    from dithead_jax.training import dit_step
    from dithead_jax.training.dit_train import DiTRun
    from dithead_jax.training.state import create_train_state, make_optimizer
    from dithead_jax.training.sync_expert_train import SyncExpertRun
    from dithead_jax.training.sync_loss import SyncLoss

    config = dit_configs.get_config("demo")
    config.train.global_batch_size = args.batch
    run = DiTRun.from_config(config)
    rules = sharding.DIT_RULES
    mesh, batch_sharding = sharding.training_mesh(run.mesh, rules, args.batch, None)
    make_dit = lambda rngs: DiT(run.model, rngs=rngs)  # noqa: E731
    states = {}
    for name in ("plain", "sync"):
        states[name], setup = create_train_state(
            make_dit, make_optimizer(run.train), seed=0, mesh=mesh, rules=rules
        )

    vq_cfg = cfg.from_dict(cfg.VQGANConfig, vqgan_configs.get_config("demo").model)
    expert_run = SyncExpertRun.from_config(expert_configs.get_config("demo"))

    def make_frozen():
        return VQGAN(vq_cfg, rngs=nnx.Rngs(1)), expert_run.make_model(nnx.Rngs(2))

    (vq_def, ex_def) = [nnx.split(m)[0] for m in nnx.eval_shape(make_frozen)]
    vq_state, ex_state = jax.jit(lambda: [nnx.split(m)[1] for m in make_frozen()])()
    c = run.model.latent_channels
    frozen = {"expert": ex_state, "vqgan": vq_state,
              "mean": jnp.zeros((c,)), "std": jnp.ones((c,))}  # fmt: skip
    frozen = jax.device_put(frozen, sharding.replicated(mesh))
    sync = SyncLoss(
        cfg=cfg.SyncLossConfig(weight=1.0, max_timestep=run.diffusion.num_timesteps),
        expert_graphdef=ex_def,
        vqgan_graphdef=vq_def,
        schedule=diffusion.make_schedule(run.diffusion),
        prediction=run.diffusion.prediction,
        image_size=expert_run.model.image_size,
    )

    rng = np.random.default_rng(0)
    n, h = args.batch, run.model.input_size
    host = {k: rng.normal(size=(n, h, h, c)).astype(np.float32)
            for k in ("latent", "masked_latent", "reference_latent")}  # fmt: skip
    host["audio"] = rng.normal(size=(n, run.model.audio_window, run.model.audio_dim))
    host["audio"] = host["audio"].astype(np.float32)
    host["mask"] = rng.uniform(size=(n, h, h)).astype(np.float32)
    keys = dit_step.batch_keys(run.diffusion, run.model)
    batch = {k: jax.device_put(host[k], batch_sharding) for k in keys}

    steps, extra, report = {}, {"plain": (), "sync": (frozen,)}, {"batch": args.batch}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        for name, loss in (("plain", None), ("sync", sync)):
            fn = dit_step.make_train_step(setup, run.diffusion, run.train, loss)
            jitted = dit_step.jit_train_step(fn, setup, batch_sharding,
                                             with_frozen=loss is not None)  # fmt: skip
            started = time.perf_counter()
            compiled = jitted.lower(states[name], batch, *extra[name]).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            report[name] = {"compile_s": round(time.perf_counter() - started, 2),
                            "gflops_per_step": round(float(cost["flops"]) / 1e9, 3)}  # fmt: skip
            steps[name] = compiled
            for _ in range(2):  # warm-up
                states[name], metrics = compiled(states[name], batch, *extra[name])
            jax.block_until_ready(metrics)
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, compiled in steps.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    states[name], metrics = compiled(states[name], batch, *extra[name])
                jax.block_until_ready(metrics)
                times[name].append((time.perf_counter() - started) / args.steps)
        for name in steps:
            report[name]["s_per_step"] = round(float(np.median(times[name])), 4)
            report[name]["s_per_step_all"] = [round(t, 4) for t in times[name]]
    report["ratio_s"] = round(report["sync"]["s_per_step"] / report["plain"]["s_per_step"], 2)
    report["ratio_flops"] = round(
        report["sync"]["gflops_per_step"] / report["plain"]["gflops_per_step"], 2
    )
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
