"""Benchmark the stage-2 DiT; prints one JSON line per measurement.

    python bench/dit.py [--sizes S_2,B_2] [--batch 2] [--repeats 3] [--skip-compile]
        [--attention-impl blockwise] [--peer DIR]
        [--compile-sizes L_2,XL_2] [--compile-batch 64] [--layouts scan,loop,...]
        [--dtypes bfloat16,float32] [--presets "dp;fsdp;fsdp_tp;data=2,fsdp=4"]
        [--out bench/results/dit_memory.json] [--append]

1. `gemm`: this machine's f32 GEMM peak (2048^3 jit matmul, best of 5): the yardstick.
2. `speed`: forward and full train-step seconds (loss, gradient, AdamW, EMA; compile
   excluded, best of --repeats) for each of --sizes at 64x64 latents (1024 tokens), with
   achieved GFLOP/s from the analytic model FLOPs (`dit_step.dit_forward_flops`; a train
   step = 3x forward) next to XLA's own count from the compiled cost analysis.
3. `compiled`: for --compile-sizes at global batch --compile-batch (64 on 8 devices: the
   8-device share of the paper-like 256 on 32) under each preset, layout and compute dtype,
   the per-device memory (argument / output / temp / total) and FLOPs of the compiled train
   step (`jit(...).lower(abstract state, abstract batch).compile()`; nothing is
   allocated). Layouts: "loop", "scan" (scan_layers) and "scan+remat:<policy>" for each
   remat policy. Written to --out (kept in the repo: bench/results/dit_memory.json) after
   every compile, so regressions show in review; --append resumes a partial sweep.
   Runs in a child process because the 8 simulated devices must be configured before jax
   starts (and would split the CPU between them for part 2).
4. `--peer DIR` (instead of 1-3): side by side in this process with the PyTorch peer, a
   facebookresearch/DiT checkout (`profile_dit.load_peer` / `build_peer`: its DiT-S/2,
   B/2 at input_size 64, in_channels 4, learn_sigma; train step = forward, MSE, backward,
   AdamW, EMA as its train.py) against ours (9-channel input, audio cross-attention,
   --attention-impl), 1024 tokens, --batch, f32, torch at 2 threads; runs alternate, best
   and median over --repeats rounds; one FLOP model for both (`forward_flops`);
   `per_flop_ours_vs_peer` = our FLOP/s / peer FLOP/s (> 1: ours faster per FLOP).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dithead_jax import sharding  # noqa: E402
from dithead_jax.config import DiffusionConfig, DiTConfig, TrainConfig  # noqa: E402
from dithead_jax.models.dit import DiT  # noqa: E402
from dithead_jax.training import dit_step, dit_train  # noqa: E402
from dithead_jax.training.metrics import cpu_model, measure_gemm_flops  # noqa: E402
from dithead_jax.training.state import create_train_state, make_optimizer  # noqa: E402


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _cost(compiled) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0]
    return {k: float(analysis.get(k, 0.0)) for k in ("flops", "bytes accessed")}


def _best(fn, args, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _batch(cfg: DiTConfig, n: int, mesh) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    latent = (n, cfg.input_size, cfg.input_size, cfg.latent_channels)
    host = {
        "latent": rng.normal(size=latent),
        "masked_latent": rng.normal(size=latent),
        "reference_latent": rng.normal(size=latent),
        "audio": rng.normal(size=(n, cfg.audio_window, cfg.audio_dim)),
    }
    batch_sharding = sharding.batch_sharding(sharding.DIT_RULES, mesh)
    return {k: jax.device_put(v.astype(np.float32), batch_sharding) for k, v in host.items()}


def build_ours(size: str, batch: int, attention_impl: str | None = None) -> dict:
    """Our DiT-{size} at 1024 tokens: compiled forward and train step (the state threads
    through the donating step), their compile seconds and XLA's FLOP counts."""
    cfg = DiTConfig.named(size, attention_impl=attention_impl)  # input 64, patch 2
    train = TrainConfig(global_batch_size=batch)
    mesh = sharding.make_mesh("dp", jax.devices()[:1])
    state, setup = create_train_state(
        lambda r: DiT(cfg, rngs=r), make_optimizer(train), seed=0, mesh=mesh,
        rules=sharding.DIT_RULES,
    )  # fmt: skip
    data = _batch(cfg, batch, mesh)
    graphdef = setup.graphdef

    def forward(params, data):
        z = data["latent"]
        x = jnp.concatenate([z, data["masked_latent"], data["reference_latent"]], axis=-1)
        t = jnp.full((z.shape[0],), 500, jnp.int32)
        return nnx.merge(graphdef, params)(x, t, data["audio"])

    start = time.perf_counter()
    fwd = jax.jit(forward).lower(state.params, data).compile()
    fwd_compile, start = time.perf_counter() - start, time.perf_counter()
    step = dit_step.jit_train_step(
        dit_step.make_train_step(setup, DiffusionConfig(), train), setup, data["latent"].sharding
    )
    step_c = step.lower(state, data).compile()
    step_compile = time.perf_counter() - start
    box = {"state": state}

    def run_step():  # the step donates its state: thread it through
        box["state"], metrics = step_c(box["state"], data)
        return metrics

    return {
        "cfg": cfg,
        "fwd": lambda: fwd(box["state"].params, data),
        "step": run_step,
        "step_compiled": step_c,
        "params_M": round(sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, 2),
        "xla_forward_gflops": round(_cost(fwd)["flops"] / 1e9, 1),
        "xla_train_step_gflops": round(_cost(step_c)["flops"] / 1e9, 1),
        "compile_s": {"forward": round(fwd_compile, 1), "train_step": round(step_compile, 1)},
    }


def speed(size: str, batch: int, repeats: int, attention_impl: str | None = None) -> dict:
    ours = build_ours(size, batch, attention_impl)
    cfg = ours["cfg"]
    fwd_s = _best(ours["fwd"], (), repeats)
    best = _best(ours["step"], (), repeats)
    fwd_flops = batch * dit_step.dit_forward_flops(cfg)
    step_flops = dit_step.dit_train_flops(cfg, batch)
    return {
        "bench": "dit_speed",
        "model": f"DiT-{size.replace('_', '/')}",
        "attention_impl": attention_impl,
        "tokens": (cfg.input_size // cfg.patch_size) ** 2,
        "batch": batch,
        "params_M": ours["params_M"],
        "forward_s": round(fwd_s, 3),
        "train_step_s": round(best, 3),
        "forward_gflops": round(fwd_flops / 1e9, 1),
        "train_step_gflops": round(step_flops / 1e9, 1),
        "forward_gflop_per_s": round(fwd_flops / fwd_s / 1e9, 1),
        "train_step_gflop_per_s": round(step_flops / best / 1e9, 1),
        **{k: ours[k] for k in ("xla_forward_gflops", "xla_train_step_gflops", "compile_s")},
    }


def forward_flops(*, tokens, d, depth, mlp, patch, c_in, c_out, keys=0, context=0.0) -> float:
    """The one analytic FLOP model for ours and the peer: matmul FLOPs (2 per multiply-add)
    of one forward pass of one example; norms, softmax, GELU, adds and the label lookup are
    not counted (<2% at 1024 tokens). L tokens, width d, MLP width m, patch p:

        patchify              2·L·p²·C_in·d
        timestep MLP          2·256·d + 2·d²
        per block (× depth):
          adaLN               2·d·6d
          self-attention      2·L·d·3d (qkv) + 2·2·L²·d (QKᵀ, PV) + 2·L·d² (out)
          MLP                 2·2·L·d·m
          cross-attn (ours)   2·L·d² (q) + 2·S·d·2d (k, v) + 2·2·L·S·d + 2·L·d² (out)
        final layer           2·d·2d + 2·L·d·p²·C_out
        context (ours)        2·W·A·d (W audio frames of A features to width d)

    S = `keys` context tokens (ours: audio window + 1). Train step = 3 × forward (backward:
    two matmuls per forward matmul), both models. Ours: = `dit_step.dit_forward_flops`.
    """
    block = 2 * d * 6 * d + 2 * tokens * d * 3 * d + 4 * tokens**2 * d + 2 * tokens * d * d
    block += 4 * tokens * d * mlp
    if keys:
        block += 2 * tokens * d * d + 4 * keys * d * d + 4 * tokens * keys * d + 2 * tokens * d * d
    flops = 2 * tokens * patch**2 * c_in * d + 2 * 256 * d + 2 * d * d + depth * block
    return float(flops + 4 * d * d + 2 * tokens * d * patch**2 * c_out + context)


def _our_flops(cfg: DiTConfig) -> float:
    flops = forward_flops(
        tokens=(cfg.input_size // cfg.patch_size) ** 2, d=cfg.hidden_size, depth=cfg.depth,
        mlp=int(cfg.hidden_size * cfg.mlp_ratio), patch=cfg.patch_size,
        c_in=3 * cfg.latent_channels, c_out=cfg.latent_channels * (2 if cfg.learn_sigma else 1),
        keys=cfg.audio_window + 1, context=2 * cfg.audio_window * cfg.audio_dim * cfg.hidden_size,
    )  # fmt: skip
    assert flops == dit_step.dit_forward_flops(cfg), "the bench's FLOP model drifted"
    return flops


def peer_side_by_side(models, size: str, args: argparse.Namespace) -> dict:
    import profile_dit
    import torch

    torch.set_num_threads(2)
    ours = build_ours(size, args.batch, args.attention_impl)
    peer = profile_dit.build_peer(models, size, args.batch)
    fwd_flops = {"ours": args.batch * _our_flops(ours["cfg"]), "peer": args.batch * peer["flops"]}
    runners = {"ours": ours, "peer": peer}
    times = {(who, mode): [] for who in runners for mode in ("fwd", "step")}
    for run in runners.values():  # warm-up: first-call allocations, thread pools
        jax.block_until_ready(run["fwd"]()), jax.block_until_ready(run["step"]())
    for _ in range(args.repeats):
        for mode in ("fwd", "step"):
            for who, run in runners.items():
                # Measured: our step right after a peer step ran up to 1.25x slower than
                # alone or after a pause (most likely the other runtime's worker threads
                # still spinning; OMP_WAIT_POLICY=PASSIVE did not prevent it). A pause before
                # every timed call, both sides alike, keeps one runtime's tail out of the
                # other's time.
                time.sleep(args.settle)
                start = time.perf_counter()
                jax.block_until_ready(run[mode]())
                times[who, mode].append(time.perf_counter() - start)
    record = {"bench": "dit_vs_peer", "model": f"DiT-{size.replace('_', '/')}",
              "attention_impl": args.attention_impl, "tokens": 1024, "batch": args.batch,
              "cpu": cpu_model(), "gemm_gflop_per_s": round(measure_gemm_flops(2048, 5) / 1e9, 1),
              "repeats": args.repeats, "settle_s": args.settle, "torch": torch.__version__,
              "torch_threads": 2,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "params_M": {"ours": ours["params_M"], "peer": peer["params_M"]}}  # fmt: skip
    for mode, factor in (("fwd", 1), ("step", 3)):
        entry = {}
        for who in runners:
            ts, flops = times[who, mode], factor * fwd_flops[who]
            entry[who] = {"best_s": round(min(ts), 3), "median_s": round(statistics.median(ts), 3),
                          "gflops": round(flops / 1e9, 1),
                          "gflop_per_s_best": round(flops / min(ts) / 1e9, 1)}  # fmt: skip
        rate = {w: factor * fwd_flops[w] / min(times[w, mode]) for w in runners}
        med = {w: factor * fwd_flops[w] / statistics.median(times[w, mode]) for w in runners}
        entry["per_flop_ours_vs_peer_best"] = round(rate["ours"] / rate["peer"], 2)
        entry["per_flop_ours_vs_peer_median"] = round(med["ours"] / med["peer"], 2)
        record["forward" if mode == "fwd" else "train_step"] = entry
    return record


LAYOUTS = ("scan+remat:nothing_saveable", "scan+remat:dots_with_no_batch_dims_saveable",
           "scan+remat:dots_saveable", "scan", "loop")  # fmt: skip


def _layout_config(size: str, layout: str, dtype: str) -> DiTConfig:
    """layout: "loop" (the default model), "scan" (scan_layers), "loop+remat:<policy>" or
    "scan+remat:<policy>" (`DiTConfig.remat_policy`; nothing_saveable is "full")."""
    base, _, policy = layout.partition(":")
    if base not in ("loop", "scan", "loop+remat", "scan+remat") or bool(policy) != base.endswith(
        "+remat"
    ):
        raise ValueError(f"unknown layout {layout!r}; e.g. loop, scan, scan+remat:dots_saveable")
    remat = {"": "none", "nothing_saveable": "full"}.get(policy, policy)
    return DiTConfig.named(
        size, remat_policy=remat, scan_layers=base.startswith("scan"), dtype=dtype
    )


def compiled_analysis(size: str, preset: str, global_batch: int, layout: str, dtype: str) -> dict:
    """Per-device cost / memory of DiT-{size}'s train step, compiled for this host's devices
    (8 simulated CPUs in the child process), traced as the trainer traces it: on the mesh
    and under the DiT's activation rules."""
    cfg = _layout_config(size, layout, dtype)
    train = TrainConfig(global_batch_size=global_batch)
    mesh = sharding.make_mesh(preset)
    rules = sharding.DIT_RULES
    # LLVM -O0: buffer assignment (the memory figures) is decided before LLVM runs.
    start = time.perf_counter()
    setup, lowered = dit_train.lower_train_step(
        cfg, train, mesh, compiler_options=dit_step.FAST_COMPILE_CPU
    )
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    gib = 2.0**30
    cost = _cost(compiled)
    analytic = dit_step.dit_train_flops(cfg, global_batch) / mesh.size
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract.params))
    hlo = compiled.as_text()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    record = {
        "model": f"DiT-{size.replace('_', '/')}",
        "mesh": preset,
        "mesh_shape": dict(mesh.shape),
        "global_batch": global_batch,
        "per_device_batch": global_batch // sharding.batch_shards(rules, mesh),
        "layout": layout,
        "dtype": dtype,
        "params_M": round(params / 1e6, 1),
        "per_device": {
            "xla_tflops": round(cost["flops"] / 1e12, 3),
            "analytic_model_tflops": round(analytic / 1e12, 3),
            "argument_gib": round(memory.argument_size_in_bytes / gib, 3),
            "output_gib": round(memory.output_size_in_bytes / gib, 3),
            "alias_gib": round(memory.alias_size_in_bytes / gib, 3),
            "temp_gib": round(memory.temp_size_in_bytes / gib, 3),
            # Peak estimate: state in + state out (donated, so aliased once) + scratch.
            "total_gib": round(total / gib, 3),
        },
        "collectives": {
            op: len(re.findall(rf" {op}\(", hlo))
            for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")
        },
        "compile_s": round(compile_s, 1),
    }
    if layout.startswith("scan"):  # XLA's cost analysis counts a while loop's body once
        record["per_device"]["xla_tflops_counts_one_layer_of_the_scan"] = True
    return record


def compile_sweep(args: argparse.Namespace) -> None:
    """Part 3, in the 8-device child: one record per (size, dtype, layout, preset), written
    to --out after every compile so a partial sweep still leaves its results."""
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() and args.append else None
    if not results:
        results = {
            "what": "per-device compiled memory/FLOPs of the DiT train step (bench/dit.py)",
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "jax": jax.__version__,
            "backend": f"{jax.default_backend()} x {jax.device_count()} (simulated)",
            "note": "global batch 64 on 8 devices = the 8-device share of 256 on 32; "
            "total = argument + output - alias + temp",
            "records": [],
        }
    done = {(r["model"], r["dtype"], r["layout"], r["mesh"]) for r in results["records"]}
    for size in filter(None, args.compile_sizes.split(",")):
        for dtype in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                for preset in args.presets.split(";"):
                    key = (f"DiT-{size.replace('_', '/')}", dtype, layout, preset)
                    if key in done:
                        continue
                    record = compiled_analysis(size, preset, args.compile_batch, layout, dtype)
                    _emit({"bench": "dit_compiled", **record})
                    results["records"].append(record)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="S_2,B_2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-sizes", default="L_2,XL_2")
    parser.add_argument("--compile-batch", type=int, default=64)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--presets", default="dp;fsdp;fsdp_tp;data=2,fsdp=4", help="';'-separated")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dit_memory.json"))
    parser.add_argument("--append", action="store_true", help="keep --out's records, add missing")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--attention-impl", default=None, help='ours: e.g. "blockwise"')
    parser.add_argument("--peer", default=None, help="a facebookresearch/DiT checkout")
    parser.add_argument("--settle", type=float, default=2.0, help="--peer: pause before each run")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for layout in args.layouts.split(","):
        try:
            _layout_config("S_2", layout, "float32")
        except ValueError as e:
            parser.error(f"--layouts: {e}")

    if args.compile_only:  # the child process of part 3
        if jax.device_count() != 8:
            raise SystemExit("--compile-only wants 8 devices: XLA_FLAGS as main() sets them")
        compile_sweep(args)
        return

    if args.peer:
        from profile_dit import load_peer  # bench/ is on sys.path when run as a script

        models = load_peer(args.peer)
        for size in filter(None, args.sizes.split(",")):
            _emit(peer_side_by_side(models, size, args))
        return
    gemm = measure_gemm_flops(n=2048, repeats=5)
    _emit({"bench": "gemm", "n": 2048, "dtype": "float32", "gflop_per_s": round(gemm / 1e9, 1),
           "devices": jax.device_count(), "cpus": os.cpu_count(), "cpu": cpu_model()})  # fmt: skip
    for size in filter(None, args.sizes.split(",")):
        record = speed(size, args.batch, args.repeats, args.attention_impl)
        record["fraction_of_gemm_peak"] = round(record["train_step_gflop_per_s"] * 1e9 / gemm, 2)
        _emit(record)

    if not args.skip_compile:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_force_host_platform_device_count=8").strip()  # fmt: skip
        cmd = [sys.executable, __file__, "--compile-only",
               f"--compile-sizes={args.compile_sizes}", f"--compile-batch={args.compile_batch}",
               f"--layouts={args.layouts}", f"--dtypes={args.dtypes}",
               f"--presets={args.presets}", f"--out={args.out}"]  # fmt: skip
        cmd += ["--append"] if args.append else []  # fmt: skip
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
