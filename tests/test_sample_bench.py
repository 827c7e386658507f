"""bench/sample.py's cost model: slot counts per order, and compiled FLOPs that agree with
the unrolled compile and the analytic count (small configs, abstract shapes only)."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from dithead_jax.config import DiTConfig, VQGANConfig
from dithead_jax.training.dit_step import dit_forward_flops

_PATH = Path(__file__).resolve().parents[1] / "bench" / "sample.py"
_SPEC = importlib.util.spec_from_file_location("bench_sample", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

# Wide enough that the matmuls dominate as in DiT-L/2 (at hidden 64 norms and softmax are
# ~5% of the count, beyond the analytic model's stated tolerance).
SMALL_DIT = DiTConfig.testing(hidden_size=256, input_size=32, depth=3, scan_layers=True)


def test_slot_counts_per_order():
    # fast preset on the 55-s clip: 1375 + 15 - 1 diagonals of 15 slots, the masked ones
    # counted as work.
    wave = bench.clip_slots("wavefront", 1375, 15)
    assert wave["sequential_calls"] == 1389 and wave["slots_per_call"] == 15
    assert wave["evaluated_slots"] == 1389 * 15 and wave["useful_slots"] == 1375 * 15
    assert wave["calls_at_max_batch"] == 1389  # 15 rows fit in one call
    # Fewer frames than steps: the window is the N frames.
    short = bench.clip_slots("wavefront", 10, 25)
    assert (short["sequential_calls"], short["slots_per_call"]) == (34, 10)
    assert short["evaluated_slots"] == 340
    # parallel: S calls of the whole clip, N*S slots, chunked to the max batch (in rows:
    # guidance doubles them).
    par = bench.clip_slots("parallel", 1375, 250, max_batch=256)
    assert (par["sequential_calls"], par["slots_per_call"]) == (250, 1375)
    assert par["evaluated_slots"] == par["useful_slots"] == 1375 * 250
    assert par["calls_at_max_batch"] == 250 * 6 and par["rows_per_chunk"] == 230
    guided = bench.clip_slots("parallel", 1375, 250, rows_per_slot=2, max_batch=256)
    assert guided["dit_rows"] == 2 * 1375 * 250 and guided["calls_at_max_batch"] == 250 * 11
    nested = bench.clip_slots("nested", 7, 5)
    assert nested["sequential_calls"] == nested["evaluated_slots"] == 35


def test_compiled_flops_scan_correction_and_analytic():
    cost = bench.dit_slot_cost(SMALL_DIT)
    unrolled = bench.compiled_forward_flops(dataclasses.replace(SMALL_DIT, scan_layers=False))
    # The scan is counted once by XLA; the block correction restores the unrolled count.
    assert cost["scan_raw_flops"] < 0.5 * unrolled
    assert cost["dit_flops"] == pytest.approx(unrolled, rel=5e-3)
    assert cost["dit_flops"] == pytest.approx(dit_forward_flops(SMALL_DIT), rel=0.03)
    assert 0 < cost["update_flops"] < 1e-3 * cost["dit_flops"]
    guided = bench.dit_slot_cost(SMALL_DIT, True)
    assert guided["rows"] == 2
    assert guided["dit_flops"] == pytest.approx(2 * cost["dit_flops"], rel=5e-3)


def test_project_clip_is_flops_over_peak_times_mfu():
    kw = dict(frames=40, fast_steps=4, dit_config=SMALL_DIT, vqgan_config=VQGANConfig.testing())
    r = bench.project_clip("fast", "h100", 0.5, vqgan_mfu=0.25, **kw)
    assert r["steps"] == 4 and r["dit_work"]["evaluated_slots"] == (40 + 3) * 4
    peak = 989e12
    assert r["dit_s"] == pytest.approx(r["dit_flops"] / (0.5 * peak), rel=1e-3)
    assert r["vqgan_s"] == pytest.approx(r["vqgan_flops"] / (0.25 * peak), rel=1e-2)
    assert r["seconds"] == pytest.approx(r["dit_s"] + r["vqgan_s"], abs=0.02)
    slow = bench.project_clip("fast", "tpu_v5p", 0.5, vqgan_mfu=0.25, **kw)
    assert slow["seconds"] == pytest.approx(r["seconds"] * 989 / 459, rel=1e-2)
    guided = bench.project_clip("fast", "h100", 0.5, True, vqgan_mfu=0.25, **kw)
    assert guided["dit_flops"] == pytest.approx(2 * r["dit_flops"], rel=1e-2)
    assert guided["vqgan_flops"] == r["vqgan_flops"]
    paper = bench.project_clip("paper", "h100", **kw)
    assert paper["steps"] == 250 and paper["dit_work"]["order"] == "parallel"
    assert paper["dit_work"]["evaluated_slots"] == 40 * 250
