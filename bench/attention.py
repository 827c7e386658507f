"""Benchmark self-attention alone, ours against PyTorch's SDPA; prints one JSON object.

    python bench/attention.py [--batch 2] [--heads 6] [--length 1024] [--head-dim 64]
        [--repeats 7] [--blocks 128x128,1024x128,256x256] [--threads 2] [--also-threads 1]

DiT-S/2's attention at 1024 tokens (B=2, 6 heads, head_dim 64), f32, forward and
forward+backward (gradients w.r.t. q, k, v of sum(out * w)), for:
  jax_einsum       softmax(q k^T / sqrt(D)) v written out as einsums (what XLA fuses alone)
  jax_dpa          jax.nn.dot_product_attention(implementation="xla")
  blockwise_QxK    dithead_jax.models.blockwise_attention at block_q=Q, block_k=K
                   (forward steps of its default FORWARD_ROWS query rows)
  torch_sdpa       torch.nn.functional.scaled_dot_product_attention (the peer), --threads
  torch_sdpa_Nt    the same at N threads (--also-threads): context, not the reference;
                   when other jobs load the machine, torch's OpenMP pool can lose more to
                   oversubscription at 2 threads than it gains
Runs alternate (each variant once per round, peer included) so load drifts hit all alike;
best-of and median over the rounds, compile / warm-up excluded. One analytic FLOP model
for every variant: forward 4*B*H*L^2*D (QK^T and PV); backward 2.5x the forward
(dV, dP, dQ, dK plus FlashAttention-2's recomputation of QK^T), so forward+backward is
3.5x. `per_flop_vs_torch` = torch time / our time at the same FLOPs (> 1: we are faster);
`per_flop_vs_fastest_torch_best` takes torch's best over every thread count.
JAX variants also report XLA's compiled temp memory (`memory_analysis()`), the buffers
the (B, H, L, L) scores dominate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dithead_jax.models.blockwise_attention import blockwise_attention  # noqa: E402

BACKWARD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (FlashAttention-2 accounting)


def einsum_attention(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def jax_variants(blocks: list[tuple[int, int]]) -> dict:
    dpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
    variants = {"jax_einsum": einsum_attention, "jax_dpa": dpa}
    for bq, bk in blocks:
        variants[f"blockwise_{bq}x{bk}"] = lambda q, k, v, bq=bq, bk=bk: blockwise_attention(
            q, k, v, block_q=bq, block_k=bk
        )
    return variants


def compile_jax(fn, q, k, v, w) -> dict:
    """Compiled forward and forward+backward callables and their temp memory."""

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    out = {}
    for name, f in (("fwd", fn), ("fwd_bwd", jax.grad(loss, argnums=(0, 1, 2)))):
        compiled = jax.jit(f).lower(q, k, v).compile()
        out[name] = compiled
        out[f"{name}_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    return out


def torch_runner(q, k, v, w, threads: int):
    import torch

    # The peer's layout: (B, heads, L, D).
    tq, tk, tv, tw = (
        torch.from_numpy(np.asarray(a).transpose(0, 2, 1, 3).copy()) for a in (q, k, v, w)
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        torch.set_num_threads(threads)  # per call: runners with other counts alternate
        with torch.no_grad():
            return sdpa(tq, tk, tv)

    def fwd_bwd():
        torch.set_num_threads(threads)
        leaves = [t.detach().requires_grad_() for t in (tq, tk, tv)]
        (sdpa(*leaves) * tw).sum().backward()
        return [t.grad for t in leaves]

    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "version": torch.__version__}


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--blocks", default="128x128,1024x128,256x256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--also-threads", default="1", help="extra torch thread counts")
    parser.add_argument("--settle", type=float, default=0.5, help="pause before each run (s)")
    args = parser.parse_args()
    b, h, length, d = args.batch, args.heads, args.length, args.head_dim
    blocks = [tuple(int(n) for n in s.split("x")) for s in args.blocks.split(",") if s]

    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=(b, length, h, d)), jnp.float32) for _ in range(4))
    runners, memory = {}, {}
    for name, fn in jax_variants(blocks).items():
        compiled = compile_jax(fn, q, k, v, w)
        runners[name] = {
            "fwd": lambda c=compiled["fwd"]: c(q, k, v),
            "fwd_bwd": lambda c=compiled["fwd_bwd"]: c(q, k, v),
        }
        memory[name] = {m: compiled[f"{m}_temp_mib"] for m in ("fwd", "fwd_bwd")}
    peer = torch_runner(q, k, v, w, args.threads)
    runners["torch_sdpa"] = {"fwd": peer["fwd"], "fwd_bwd": peer["fwd_bwd"]}
    for n in (int(t) for t in args.also_threads.split(",") if t):
        runners[f"torch_sdpa_{n}t"] = torch_runner(q, k, v, w, n)

    times = {name: {"fwd": [], "fwd_bwd": []} for name in runners}
    for run in runners.values():  # warm-up (first-call allocations, thread pools)
        run["fwd"](), run["fwd_bwd"]()
    for _ in range(args.repeats):  # alternating: every variant once per round
        for name, run in runners.items():
            for mode in ("fwd", "fwd_bwd"):
                time.sleep(args.settle)  # the other runtime's threads settle (bench/dit.py)
                times[name][mode].append(timed(run[mode]))

    fwd_flops = 4 * b * h * length**2 * d
    flops = {"fwd": fwd_flops, "fwd_bwd": fwd_flops * (1 + BACKWARD_FACTOR)}
    results = {}
    for name, modes in times.items():
        entry = {}
        for mode, ts in modes.items():
            best, median = min(ts), statistics.median(ts)
            peer_ts = times["torch_sdpa"][mode]
            torch_best = min(min(t[mode]) for n, t in times.items() if n.startswith("torch"))
            entry[mode] = {
                "best_ms": round(best * 1e3, 1),
                "median_ms": round(median * 1e3, 1),
                "gflops_best": round(flops[mode] / best / 1e9, 1),
                "per_flop_vs_torch_best": round(min(peer_ts) / best, 2),
                "per_flop_vs_torch_median": round(statistics.median(peer_ts) / median, 2),
                "per_flop_vs_fastest_torch_best": round(torch_best / best, 2),
            }
            if name in memory:
                entry[mode]["temp_mib"] = round(memory[name][mode], 1)
        results[name] = entry
    record = {
        "bench": "attention",
        "shape": {"batch": b, "heads": h, "length": length, "head_dim": d, "dtype": "float32"},
        "flops": {
            "fwd": fwd_flops,
            "fwd_bwd": flops["fwd_bwd"],
            "backward_factor": BACKWARD_FACTOR,
        },
        "repeats": args.repeats,
        "settle_s": args.settle,
        "threads_torch": args.threads,
        "jax": jax.__version__,
        "torch": peer["version"],
        "results": results,
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
