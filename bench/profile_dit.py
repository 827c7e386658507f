"""Where the DiT train step's time goes, ours (JAX) against the PyTorch peer; one JSON object.

    python bench/profile_dit.py --peer DIR [--size S_2] [--batch 2] [--steps 3]
        [--repeats 3] [--attention-impls none,blockwise] [--out /tmp/dit_profile] [--top 15]

What it measures (f32, 1024 tokens, --batch, torch at 2 threads; compile / warm-up excluded):
  ours.components   best-of --repeats seconds of the whole train step for each
                    --attention-impls, and of one block's parts in isolation, forward +
                    backward (value_and_grad of sum(out * w) w.r.t. the part's parameters
                    and input, jitted alone): self-attention (each impl), audio
                    cross-attention, MLP, the whole block; `x_depth` multiplies by the
                    depth. step - depth x block is what is outside the blocks (embedding,
                    final layer, loss, AdamW, EMA) plus what fusing inside the step saves
                    or costs. Isolated parts run without the step's neighbours, so the
                    numbers are estimates, not a partition.
  ours.trace        a jax.profiler trace of --steps train steps (first impl) written to
                    --out/jax (open with TensorBoard / Perfetto); its XLA:CPU thunk events
                    (one per HLO fusion / op, e.g. "ynn_fusion.628", a YNNPACK dot fusion)
                    in seconds per step summed over threads: `by_kind` (numeric suffix
                    dropped), `top_thunks` with the JAX op_name of the fused root (the
                    compiled HLO's metadata; "transpose(...)" = backward). The wrapper
                    events that nest them (ThunkExecutor::Execute) are reported apart.
                    `hlo_ops` counts the compiled step's entry opcodes and dot fusions.
  peer.top_ops      torch.profiler key_averages() of --steps peer train steps (its
                    train.py: forward, MSE, backward, AdamW, EMA), top --top ops by self CPU
                    time, ms per step; the table also goes to --out/torch_ops.txt.
"""

from __future__ import annotations

import argparse
import collections
import copy
import glob
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dit as dit_bench  # noqa: E402  (bench/dit.py; it puts the repo root on sys.path)

from dithead_jax.config import DiTConfig  # noqa: E402
from dithead_jax.models.dit import DiT  # noqa: E402

_TORCHVISION_STUB_OPS = None  # keeps the torch.library fragment alive (see load_peer)


def load_peer(peer_dir: str):
    """facebookresearch/DiT's `models` module from `peer_dir`. Its timm layers import
    torchvision (`torchvision.ops.misc`), whose Python part is all the DiT needs. Where only
    a CUDA build of torchvision is at hand (this machine's torch is the CPU wheel), its `_C`
    fails to load and the import then stops registering fakes for two ops nobody defined,
    `torchvision::nms` / `qnms`: their schemas are defined here (never called) and the
    import retried. E.g. `pip install --no-deps --target DIR/deps torchvision==0.28.0`, then
    PYTHONPATH=DIR/deps; timm from PyPI.

    Sets OMP_WAIT_POLICY=PASSIVE unless set (before torch loads its OpenMP runtime): with
    the default, torch's idle OpenMP threads spin and, alternating in one process on 2
    cores, slowed JAX's forward 1.7x and the peer's own step 4x; PASSIVE cost the peer
    alone ~4% here."""
    global _TORCHVISION_STUB_OPS
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        print("warning: torch already loaded; OMP_WAIT_POLICY unset", file=sys.stderr)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        _TORCHVISION_STUB_OPS = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _TORCHVISION_STUB_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou) -> Tensor")
        import torchvision  # noqa: F401
    sys.path.insert(0, str(Path(peer_dir).resolve()))
    import models  # the peer's models.py

    return models


def build_peer(models, size: str, batch: int) -> dict:
    """The peer's DiT-{size} at 64x64 latents (1024 tokens) with forward / train-step
    callables; the step as its train.py: AdamW (lr 1e-4, weight decay 0), EMA 0.9999."""
    import torch

    torch.manual_seed(0)
    model = models.DiT_models[f"DiT-{size.replace('_', '/')}"](input_size=64)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch, model.in_channels, 64, 64)
    noise, t = torch.randn_like(x), torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 1000, (batch,))
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def fwd():
        with torch.no_grad():
            return model(x, t, y)

    def step():
        out = model(x, t, y)
        loss = ((out[:, : model.in_channels] - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # train.py's update_ema
            for e, p in zip(ema_params, params, strict=True):
                e.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
        return loss

    flops = dit_bench.forward_flops(
        tokens=model.x_embedder.num_patches, d=model.pos_embed.shape[-1],
        depth=len(model.blocks), mlp=model.blocks[0].mlp.fc1.out_features,
        patch=model.patch_size, c_in=model.in_channels, c_out=model.out_channels,
    )  # fmt: skip
    n = sum(p.numel() for p in params)
    return {"fwd": fwd, "step": step, "flops": flops, "params_M": round(n / 1e6, 2)}


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def _part_fwd_bwd(module, inputs: tuple, repeats: int) -> float:
    """Best seconds of jit(value_and_grad) of sum(module(*inputs) * w) w.r.t. the module's
    parameters and its first input."""
    graphdef, params = nnx.split(module)
    w = jax.random.normal(jax.random.key(1), inputs[0].shape, inputs[0].dtype)

    def loss(params, x, *rest):
        return jnp.sum(nnx.merge(graphdef, params)(x, *rest) * w)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return _best(lambda: grad(params, *inputs), repeats)


def component_times(size: str, batch: int, impls: list, repeats: int) -> dict:
    out, cfg = {}, None
    for impl in impls:
        ours = dit_bench.build_ours(size, batch, impl)
        cfg = ours["cfg"]
        out[f"train_step[{impl}]"] = _best(ours["step"], repeats)
        del ours
    d, tokens = cfg.hidden_size, (cfg.input_size // cfg.patch_size) ** 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, tokens, d)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(batch, d)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(batch, cfg.audio_window + 1, d)), jnp.float32)
    for impl in impls:
        block = DiT(DiTConfig.named(size, attention_impl=impl), rngs=nnx.Rngs(0)).blocks[0]
        out[f"self_attention[{impl}]"] = _part_fwd_bwd(block.attn, (x,), repeats)
        if impl == impls[0]:
            out["cross_attention"] = _part_fwd_bwd(block.cross_attn, (x, context), repeats)
            out["mlp"] = _part_fwd_bwd(block.mlp, (x,), repeats)
        out[f"block[{impl}]"] = _part_fwd_bwd(block, (x, c, context), repeats)
    record = {k: {"s": round(v, 4)} for k, v in out.items()}
    for k, v in out.items():
        if not k.startswith("train_step"):
            record[k]["x_depth_s"] = round(v * cfg.depth, 3)
    for impl in impls:
        rest = out[f"train_step[{impl}]"] - cfg.depth * out[f"block[{impl}]"]
        record[f"step_minus_depth_x_block[{impl}]"] = {"s": round(rest, 3)}
    return {"depth": cfg.depth, "seconds": record}


def jax_trace(size: str, batch: int, impl, steps: int, out_dir: Path, top: int) -> dict:
    ours = dit_bench.build_ours(size, batch, impl)
    _best(ours["step"], 1)
    record = trace_thunks(ours["step"], ours["step_compiled"].as_text(), steps, out_dir, top)
    return {"attention_impl": impl, **record}


def trace_thunks(run_step, hlo: str, steps: int, out_dir: Path, top: int) -> dict:
    """A jax.profiler trace of `steps` calls of `run_step` (warm) into `out_dir`/jax, as
    XLA:CPU thunk seconds per step summed over threads: by kind, the top `top` thunks with
    the op_name of their HLO root in `hlo` (the compiled step's text), and its op counts."""
    from jax.profiler import ProfileData

    trace_dir = out_dir / "jax"
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(steps):
            jax.block_until_ready(run_step())
    path = sorted(glob.glob(str(trace_dir / "**" / "*.xplane.pb"), recursive=True))[-1]
    totals, counts, threads = collections.Counter(), collections.Counter(), set()
    skip = ("ThreadpoolListener", "end: ", "ThunkExecutor::Execute (wait")
    for plane in ProfileData.from_file(path).planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue  # python / runtime lines
            for ev in line.events:
                if ev.name.startswith(skip):
                    continue
                totals[ev.name] += ev.duration_ns / 1e9 / steps
                counts[ev.name] += 1
                threads.add(line.name)
    wrappers = {n: totals.pop(n) for n in _WRAPPERS if n in totals}  # they nest the thunks
    kinds = collections.Counter()
    for name, sec in totals.items():
        kinds[re.sub(r"\.\d+$", "", name)] += sec
    return {
        "trace": path,
        "threads_with_events": len(threads),
        "wrapper_seconds_per_step": {n: round(v, 3) for n, v in wrappers.items()},
        "thunk_seconds_per_step_summed_over_threads": round(sum(totals.values()), 3),
        "by_kind": {k: round(v, 3) for k, v in kinds.most_common(10)},
        "top_thunks": [
            {
                "name": n,
                "s_per_step": round(sec, 4),
                "calls_per_step": counts[n] // steps,
                "hlo_op_name": _op_name(hlo, n),
            }
            for n, sec in totals.most_common(top)
        ],  # fmt: skip
        "hlo_ops": _hlo_ops(hlo),
    }


_WRAPPERS = ("ThunkExecutor::Execute", "SlinkyThreadPool::Await")


def _op_name(hlo: str, name: str) -> str | None:
    """The JAX op_name metadata of HLO instruction `name` (or of the first instruction of
    the computation it calls): which jaxpr equation, forward or transpose, it came from."""
    m = re.search(rf"^\s*(?:ROOT )?%{re.escape(name)} = .*$", hlo, re.M)
    if not m:
        return None
    line = m.group(0)
    meta = re.search(r'op_name="([^"]*)"', line)
    if not meta and (call := re.search(r"calls=%([\w.-]+)", line)):
        body = re.search(rf"^%{re.escape(call.group(1))} .*?\n\}}", hlo, re.M | re.S)
        dots = re.findall(r' dot\(.*?op_name="([^"]*)"', body.group(0)) if body else []
        meta = dots[0] if dots else None
        return meta[-160:] if meta else None
    return meta.group(1)[-160:] if meta else None


def _hlo_ops(hlo: str) -> dict:
    """Opcode counts of the compiled step's entry computation, and how many fused
    computations hold a dot (a matmul XLA fused with its neighbours)."""
    comps = hlo.split("\n\n")
    entry = next((c for c in comps if c.lstrip().startswith("ENTRY")), "")
    ops = collections.Counter(re.findall(r"^\s*(?:ROOT )?%\S+ = \S+ ([\w-]+)\(", entry, re.M))
    fused = [c for c in comps if c.lstrip().startswith("%fused")]
    return {"entry_opcodes": dict(ops.most_common(12)), "fused_computations": len(fused),
            "fused_computations_with_dot": sum(" dot(" in c for c in fused)}  # fmt: skip


def torch_profile(models, size: str, batch: int, steps: int, top: int, out_dir: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(2)
    peer = build_peer(models, size, batch)
    start = time.perf_counter()
    peer["step"]()  # warm-up
    warm = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            peer["step"]()
        wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=40)
    (out_dir / "torch_ops.txt").write_text(table)
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "step_s_under_profiler": round(wall, 3),
        "first_step_s": round(warm, 3),
        "top_ops": [
            {
                "name": e.key,
                "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 1),
                "total_ms_per_step": round(e.cpu_time_total / 1e3 / steps, 1),
                "calls_per_step": e.count // steps,
            }
            for e in rows
        ],  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", required=True, help="a facebookresearch/DiT checkout")
    parser.add_argument("--size", default="S_2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention-impls", default="none,blockwise")
    parser.add_argument("--out", default="/tmp/dit_profile")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    impls = [None if s == "none" else s for s in args.attention_impls.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = load_peer(args.peer)
    record = {
        "bench": "dit_profile",
        "model": f"DiT-{args.size.replace('_', '/')}",
        "batch": args.batch,
        "tokens": 1024,
        "jax": jax.__version__,
        "ours": {
            "components": component_times(args.size, args.batch, impls, args.repeats),
            "trace": jax_trace(args.size, args.batch, impls[0], args.steps, out_dir, args.top),
        },
        "peer": torch_profile(models, args.size, args.batch, args.steps, args.top, out_dir),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
