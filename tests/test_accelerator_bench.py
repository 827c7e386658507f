"""bench/accelerator.py --tiny: the accelerator check's code paths, end to end on CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_bench_tiny_runs_every_measurement(tmp_path):
    out = tmp_path / "accelerator.json"
    # A bogus layout must cost only its own two entries, recorded as errors; a mesh that
    # does not fit 8 devices is recorded as skipped.
    result = subprocess.run(
        [sys.executable, "bench/accelerator.py", "--tiny", "--out", str(out),
         "--layouts", "scan+remat:dots_saveable,bogus", "--presets", "dp;fsdp;data=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[1:] == report["results"]  # the header line, then one line per measurement
    assert report["platform"] == "cpu" and report["devices"] == 8 and not report["isolated"]

    by_bench: dict[str, list[dict]] = {}
    for record in report["results"]:
        by_bench.setdefault(record["bench"], []).append(record)
    (unfit,) = [r for r in by_bench["train"] if r["preset"] == "data=3"]
    assert "needs 3 devices, there are 8" in unfit["skipped"]
    measured = [r for r in by_bench["train"] if "layout" in r]
    train = {r["preset"]: r for r in measured if r["layout"] != "bogus"}
    bogus = [r for r in measured if r["layout"] == "bogus"]
    assert len(bogus) == 2 and all("unknown layout 'bogus'" in r["error"] for r in bogus)
    assert set(train) == {"dp", "fsdp"}
    assert train["dp"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert train["fsdp"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for r in train.values():
        assert "error" not in r and "skipped" not in r, r
        assert r["global_batch"] == 2 * 8 and r["step_s"] > 0
        assert 0 < r["mfu"] < 1 and r["peak_memory_gib"] is None  # CPU reports no peak
        assert r["compiled_memory_per_device"]["temp_bytes"] > 0
    # fsdp splits parameters and optimizer state 8 ways, dp replicates them: the compiled
    # arguments (the state, donated) show it.
    dp_args = train["dp"]["compiled_memory_per_device"]["argument_bytes"]
    fsdp_args = train["fsdp"]["compiled_memory_per_device"]["argument_bytes"]
    assert fsdp_args < dp_args / 3
    (sample,) = by_bench["sample"]
    assert sample["dit_calls"] == 6 + 3 - 1 and sample["frames_per_s"] > 0
    (vqgan,) = by_bench["vqgan"]
    assert vqgan["encode_images_per_s"] > 0 and vqgan["decode_images_per_s"] > 0
    assert vqgan["latent"] == [8, 8] and vqgan["batch"] == 8
