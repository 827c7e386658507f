"""One-command accelerator check: DiT-L/2 training, video sampling and VQGAN throughput.

    python bench/accelerator.py [--out bench/results/accelerator.json] [--budget-s 420]
        [--presets "dp;fsdp;fsdp_tp"] [--layouts scan+remat:POLICY,scan,loop]
        [--dtypes bfloat16,float32] [--attention xla,cudnn] [--batch-per-device 8]
        [--isolate auto|on|off] [--tiny]

Run it on the machine to measure (one GPU/TPU host; every local device is used). Each
measurement prints one JSON line and the whole set is written to --out:

  train    DiT-L/2 (1024 tokens) train step per mesh preset x layout x compute dtype x
           attention implementation, at --batch-per-device examples per device: seconds per
           step (after two warm-up steps), examples/s, MFU = analytic model FLOPs
           (`dit_step.dit_train_flops`, 3x forward; remat's recomputation is not counted)
           over the device peak (`metrics.peak_flops_per_device`), the compiled per-device
           memory (`memory_analysis()`) and the measured peak (`memory_stats()
           ["peak_bytes_in_use"]`, where the platform reports it).
  sample   frames/s of the wavefront DDIM sampler (`x0_same_step`: N + S - 1 DiT calls
           of batch min(N, S)) for one clip, DiT-L/2 in bf16, compile excluded.
  vqgan    encode and decode images/s of the f4 VQGAN (256^2 frames <-> 64x64x3
           latents), batch split over all local devices, data already on the devices.

Every measurement is wrapped on its own: an out-of-memory or an unsupported kernel is
recorded as {"error": ...} and the rest still run. With --isolate (default on where the
device reports memory statistics, i.e. GPU/TPU) each one runs in a child process, so the
peak-memory counter (which never resets) belongs to that measurement alone and an OOM
cannot poison the next one. --budget-s: measurements that would start after this many
seconds are recorded as skipped (the most informative ones run first) and a running one
is stopped there, so the default 420 s bounds a run at about 7.5 minutes with start-up
(not yet run on a GPU or TPU: only --tiny on CPU has been).

--tiny runs the same code on `DiTConfig.testing()` / `VQGANConfig.testing()` at small batch
(the test suite runs it on 8 simulated CPU devices).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dithead_jax import sharding  # noqa: E402
from dithead_jax.config import DiffusionConfig, DiTConfig, TrainConfig, VQGANConfig  # noqa: E402
from dithead_jax.training import dit_step, metrics  # noqa: E402

GIB = 2.0**30
PROG = "bench/accelerator.py"


# ---------------------------------------------------------------------------------------
# What to measure


def default_attention(platform: str) -> list[str | None]:
    """The fused kernel against XLA's attention where there is one: cuDNN flash attention
    on GPU (bf16 only), the Pallas splash kernel on TPU (`models/layers.py`)."""
    return {"gpu": ["cudnn", "xla"], "tpu": ["splash", "xla"]}.get(platform, [None])


def train_specs(
    args: argparse.Namespace, info: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train measurements, presets skipped with why), most informative first: the
    recommended layout (first of --layouts, first dtype, first attention) for every preset,
    then the rest. Presets that resolve to the same mesh on this host (all of them on one
    device) are measured once; presets that do not fit the device count are skipped."""
    count = info["devices"]
    presets, seen, skipped = [], set(), []
    for preset in args.presets.split(";"):
        try:
            shape = sharding.mesh_shape(sharding.mesh_config(preset), count)
        except ValueError as e:
            skipped.append({"bench": "train", "preset": preset, "skipped": str(e)})
            continue
        if shape not in seen:
            seen.add(shape)
            presets.append(preset)
    attention = args.attention.split(",") if args.attention else default_attention(info["platform"])
    specs = []
    for layout, dtype, attn in itertools.product(
        args.layouts.split(","), args.dtypes.split(","), attention
    ):
        if attn == "cudnn" and dtype == "float32":
            continue  # cuDNN's fused attention takes fp16/bf16 only
        for preset in presets:
            specs.append({"preset": preset, "layout": layout, "dtype": dtype, "attention": attn})
    return specs, skipped


# The first is configs/dit.py's L_2 default (measured in bench/results/dit_memory.json).
LAYOUTS = (
    "scan+remat:dots_with_no_batch_dims_saveable",
    "scan+remat:nothing_saveable",
    "scan",
    "loop",
)


def _dit_config(tiny: bool, **overrides: Any) -> DiTConfig:
    return DiTConfig.testing(**overrides) if tiny else DiTConfig.named("L_2", **overrides)


def _layout(layout: str) -> dict[str, Any]:
    """ "loop" | "scan" | "loop+remat:<policy>" | "scan+remat:<policy>" -> DiTConfig fields
    (as bench/dit.py names them; nothing_saveable is the "full" policy)."""
    base, _, policy = layout.partition(":")
    if base not in ("loop", "scan", "loop+remat", "scan+remat") or bool(policy) != base.endswith(
        "+remat"
    ):
        raise ValueError(f"unknown layout {layout!r}; e.g. loop, scan, scan+remat:dots_saveable")
    remat = {"": "none", "nothing_saveable": "full"}.get(policy, policy)
    return {"scan_layers": base.startswith("scan"), "remat_policy": remat}


# ---------------------------------------------------------------------------------------
# Measurements (each returns one JSON-able dict)


@functools.cache
def peak_flops_per_device() -> float | None:
    """Once per process: on CPU it is a timed GEMM (shared by the simulated devices)."""
    return metrics.peak_flops_per_device()


def _peak_bytes() -> int | None:
    """The largest `peak_bytes_in_use` over the local devices; None where not reported."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _compiled_memory(compiled: Any) -> dict[str, float]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    parts = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "alias": m.alias_size_in_bytes,
    }
    out = {f"{k}_bytes": int(v) for k, v in parts.items()}
    # Donated state is both argument and output: count it once.
    total = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
    out["total_gib"] = round(total / GIB, 3)
    return out


def _compiler_options() -> dict[str, Any] | None:
    """LLVM -O0 on CPU (the --tiny runs: compile time is all there is); defaults elsewhere."""
    return dit_step.FAST_COMPILE_CPU if jax.devices()[0].platform == "cpu" else None


def _init(make: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """A module's (graphdef, state) from one jitted init: eager init would compile a small
    program per parameter op (most of a --tiny run's time)."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1], compiler_options=_compiler_options())()
    return graphdef, state


def _random_batch(cfg: DiTConfig, n: int, batch_sharding: Any) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    latent = (n, cfg.input_size, cfg.input_size, cfg.latent_channels)
    host = {k: rng.standard_normal(latent, np.float32)
            for k in ("latent", "masked_latent", "reference_latent")}  # fmt: skip
    host["audio"] = rng.standard_normal((n, cfg.audio_window, cfg.audio_dim), np.float32)
    return {k: jax.device_put(v, batch_sharding) for k, v in host.items()}


def measure_train(spec: dict[str, Any], *, tiny: bool, batch_per_device: int, steps: int) -> dict:
    from dithead_jax.models.dit import DiT
    from dithead_jax.training.state import create_train_state, make_optimizer

    cfg = _dit_config(
        tiny, dtype=spec["dtype"], attention_impl=spec["attention"], **_layout(spec["layout"])
    )
    mesh = sharding.make_mesh(spec["preset"])
    rules = sharding.DIT_RULES
    batch_sharding = sharding.batch_sharding(rules, mesh)
    global_batch = batch_per_device * sharding.batch_shards(rules, mesh)
    train = TrainConfig(global_batch_size=global_batch)
    options = _compiler_options()
    # Traced as the trainer traces it: on the mesh and under the DiT's rules, so activation
    # sharding constraints resolve to this preset's axes.
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state, setup = create_train_state(
            lambda r: DiT(cfg, rngs=r), make_optimizer(train), seed=0, mesh=mesh, rules=rules,
            compiler_options=options,
        )  # fmt: skip
        batch = _random_batch(cfg, global_batch, batch_sharding)
        step = dit_step.jit_train_step(
            dit_step.make_train_step(setup, DiffusionConfig(), train), setup, batch_sharding,
            options,
        )  # fmt: skip
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
    for _ in range(2):  # warm-up: first-touch allocations, autotuning caches
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / steps
    if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")
    flops = dit_step.dit_train_flops(cfg, global_batch)
    peak = peak_flops_per_device()
    peak_bytes = _peak_bytes()
    return {
        **spec,
        "mesh": dict(mesh.shape),
        "global_batch": global_batch,
        "step_s": round(step_s, 4),
        "examples_per_s": round(global_batch / step_s, 2),
        "model_tflops_per_step": round(flops / 1e12, 3),
        "tflops_per_device": round(flops / step_s / mesh.size / 1e12, 3),
        "peak_tflops_per_device": round(peak / 1e12, 3) if peak else None,
        "mfu": round(flops / step_s / (peak * mesh.size), 4) if peak else None,
        "compiled_memory_per_device": _compiled_memory(compiled),
        "peak_memory_gib": round(peak_bytes / GIB, 3) if peak_bytes is not None else None,
        "compile_s": round(compile_s, 1),
        "loss": float(metrics["loss"]),
    }


def measure_sample(*, tiny: bool, frames: int, steps: int, dtype: str, attention: str | None):
    from dithead_jax.diffusion import ddim
    from dithead_jax.diffusion.schedule import make_schedule
    from dithead_jax.models.dit import DiT

    cfg = _dit_config(tiny, dtype=dtype, attention_impl=attention)
    # Values do not change the cost (no data-dependent control flow): a fresh model will do.
    graphdef, state = _init(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    schedule = make_schedule(DiffusionConfig())
    rng = np.random.default_rng(0)
    size = cfg.input_size
    inputs = (
        jnp.asarray(rng.standard_normal((1, frames, size, size, cfg.latent_channels), np.float32)),
        jnp.asarray(rng.standard_normal((1, frames, cfg.audio_window, cfg.audio_dim), np.float32)),
        jnp.asarray(rng.standard_normal((1, size, size, cfg.latent_channels), np.float32)),
        jax.random.key(0),
    )

    @functools.partial(jax.jit, compiler_options=_compiler_options())
    def run(state, masked, audio, first, key):
        return ddim.sample_video(
            nnx.merge(graphdef, state), schedule, masked, audio, first, key,
            num_steps=steps, mode="x0_same_step", order="wavefront",
        )  # fmt: skip

    start = time.perf_counter()
    compiled = run.lower(state, *inputs).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(state, *inputs))
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, *inputs))
        best = min(best, time.perf_counter() - start)
    calls = ddim.dit_calls_per_clip("wavefront", frames, steps)
    cpu = jax.devices()[0].platform == "cpu"
    flops = calls["evaluations"] * dit_step.dit_forward_flops(cfg)
    peak = peak_flops_per_device()
    return {
        "dtype": dtype,
        "attention": attention,
        "frames": frames,
        "steps": steps,
        "order": "wavefront",
        "dit_calls": calls["calls"],
        "batch_per_call": calls["slots_per_call"],
        "run_s": round(best, 3),
        "frames_per_s": round(frames / best, 3),
        # One device runs the clip; simulated CPU devices share the cores, so no CPU MFU.
        "mfu_one_device": round(flops / best / peak, 4) if peak and not cpu else None,
        "compile_s": round(compile_s, 1),
    }


def measure_vqgan(*, tiny: bool, batch_per_device: int, dtype: str, repeats: int = 3) -> dict:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dithead_jax.models.vqgan import VQGAN

    cfg = (VQGANConfig.testing if tiny else VQGANConfig.f4_16384)(dtype=dtype)
    devices = jax.local_devices()
    mesh = sharding.make_mesh("dp", devices)
    graphdef, state = _init(lambda: VQGAN(cfg, rngs=nnx.Rngs(0)))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    n = batch_per_device * len(devices)
    size, f = cfg.resolution, cfg.downsample_factor
    split = NamedSharding(mesh, P("data"))
    frames = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (n, size, size, 3), np.uint8), split
    )

    @functools.partial(jax.jit, compiler_options=_compiler_options())
    def encode(state, frames):
        return nnx.merge(graphdef, state).encode(frames.astype(jnp.float32) / 127.5 - 1.0)

    @functools.partial(jax.jit, compiler_options=_compiler_options())
    def decode(state, z):  # D quantises first, as sampling does
        images = nnx.merge(graphdef, state).decode(z)
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    out: dict[str, Any] = {"dtype": dtype, "image_size": size, "latent": [size // f] * 2,
                           "batch": n, "devices": len(devices)}  # fmt: skip
    z = None
    for name, fn, arg in (("encode", encode, frames), ("decode", decode, None)):
        arg = z if arg is None else arg
        start = time.perf_counter()
        compiled = fn.lower(state, arg).compile()
        out[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
        result = jax.block_until_ready(compiled(state, arg))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, arg))
            best = min(best, time.perf_counter() - start)
        out[f"{name}_images_per_s"] = round(n / best, 2)
        if name == "encode":
            z = result
    return out


# ---------------------------------------------------------------------------------------
# Driver


@dataclasses.dataclass
class Job:
    bench: str
    params: dict[str, Any]


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "jax": jax.__version__,
        "memory_stats": _peak_bytes() is not None,
    }


def run_job(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    if job.bench == "info":
        return device_info()
    if job.bench == "train":
        return measure_train(
            job.params, tiny=args.tiny, batch_per_device=args.batch_per_device, steps=args.steps
        )
    if job.bench == "sample":
        return measure_sample(tiny=args.tiny, **job.params)
    if job.bench == "vqgan":
        return measure_vqgan(tiny=args.tiny, **job.params)
    raise ValueError(f"unknown measurement {job.bench!r}")


def run_isolated(job: Job, argv: list[str], timeout: float) -> dict[str, Any]:
    """`job` in a child process (the same command line plus --child); its last JSON line."""
    child = [sys.executable, __file__, *argv, "--child", json.dumps(dataclasses.asdict(job))]
    try:
        done = subprocess.run(child, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (--budget-s)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"child exited {done.returncode}: {tail[-800:]}"}
    return json.loads(lines[-1])


def jobs_in_order(
    args: argparse.Namespace, info: dict[str, Any]
) -> tuple[list[Job], list[dict[str, Any]]]:
    """The jobs in the order they run, and the presets skipped for this device count."""
    specs, skipped = train_specs(args, info)
    train = [Job("train", s) for s in specs]
    attention = args.attention.split(",") if args.attention else default_attention(info["platform"])
    sample_attention = attention[0]
    first_dtype = args.dtypes.split(",")[0]
    if sample_attention == "cudnn" and first_dtype == "float32":
        sample_attention = "xla"
    sample = Job("sample", {"frames": args.sample_frames, "steps": args.sample_steps,
                            "dtype": first_dtype, "attention": sample_attention})  # fmt: skip
    vqgan = Job("vqgan", {"batch_per_device": args.vqgan_batch_per_device, "dtype": first_dtype})
    # One train measurement per preset first (the recommended layout), then the
    # sampler and the VQGAN, then the remaining train variants.
    presets = len({j.params["preset"] for j in train})
    return train[:presets] + [sample, vqgan] + train[presets:], skipped


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/accelerator.json")
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU, tests)")
    p.add_argument("--presets", default="dp;fsdp;fsdp_tp",
                   help="';'-separated mesh specs, e.g. 'dp;fsdp;data=2,fsdp=-1'")  # fmt: skip
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--attention", default="", help="comma list; default: per platform")
    p.add_argument("--batch-per-device", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed train steps")
    p.add_argument("--sample-frames", type=int, default=100)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--vqgan-batch-per-device", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--isolate", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch_per_device", "steps", "sample_frames", "sample_steps",
                 "vqgan_batch_per_device"):  # fmt: skip
        if getattr(args, name) < 1:
            p.exit(2, f"{PROG}: --{name.replace('_', '-')} must be >= 1\n")
    if args.tiny:  # unless given: a covering subset at sizes that run in seconds on a CPU
        given = set(argv if argv is not None else sys.argv[1:])
        small = {"--batch-per-device": ("batch_per_device", 2), "--steps": ("steps", 2),
                 "--sample-frames": ("sample_frames", 6), "--sample-steps": ("sample_steps", 3),
                 "--vqgan-batch-per-device": ("vqgan_batch_per_device", 1),
                 "--presets": ("presets", "dp;fsdp"),
                 "--layouts": ("layouts", LAYOUTS[0]),
                 # CPUs emulate bf16 (slowly); the dtype is only a config field here.
                 "--dtypes": ("dtypes", "float32")}  # fmt: skip
        for flag, (name, value) in small.items():
            if not any(a == flag or a.startswith(flag + "=") for a in given):
                setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        job = Job(**json.loads(args.child))
        print(json.dumps(run_job(job, args)), flush=True)
        return 0
    started = time.perf_counter()
    # A process that opened a TPU holds it (and on GPU, JAX preallocates most of the
    # memory): when children measure, the parent must not touch the devices at all, so a
    # child reports what they are. JAX_PLATFORMS=cpu (the tests) needs no such care.
    if args.isolate == "off" or os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        info, isolate = device_info(), args.isolate == "on"
    else:
        info = run_isolated(Job("info", {}), argv, timeout=600)
        if "error" in info:
            print(f"{PROG}: cannot start a measuring process: {info['error']}", file=sys.stderr)
            return 1
        isolate = args.isolate == "on" or info["memory_stats"]
    report: dict[str, Any] = {
        **{k: v for k, v in info.items() if k != "memory_stats"},
        "tiny": args.tiny,
        "isolated": isolate,
        "results": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "results"}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs, skipped = jobs_in_order(args, info)
    for record in skipped:
        print(json.dumps(record), flush=True)
        report["results"].append(record)
    for job in jobs:
        left = args.budget_s - (time.perf_counter() - started)
        record: dict[str, Any] = {"bench": job.bench, **job.params}
        if left <= 0:
            record["skipped"] = f"over --budget-s {args.budget_s:.0f}"
        elif isolate:
            record.update(run_isolated(job, argv, left))
        else:
            try:
                record.update(run_job(job, args))
                if record.get("peak_memory_gib") is not None:  # the counter never resets
                    record["peak_memory_note"] = "process peak so far (--isolate off)"
            except Exception as e:  # one failure (OOM, missing kernel) must not lose the rest
                record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:800]}"
                traceback.print_exc(file=sys.stderr)
        print(json.dumps(record), flush=True)
        report["results"].append(record)
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=1))  # after each: a crash keeps the rest
    return 0


if __name__ == "__main__":
    sys.exit(main())
