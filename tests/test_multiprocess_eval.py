"""`sample.py --eval` as 2 processes x 4 CPU devices (jax.distributed on localhost, gloo)
gives the one-process report: each process generates its own clips, process 0 writes it.

The run is real but untrained: freshly initialised VQGAN and DiT checkpoints written by the
training library (what train.py saves at step 0), real stage-1 records from the synthetic
set and real stage-2 latents from data/encode_latents.py. Training them would only add
minutes; what is under test is how the clips are split and gathered.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from stage2_data import save_initial_dit, save_initial_vqgan

from dithead_jax.training.dit_step import FAST_COMPILE_CPU

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(*args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, f"{args[0]}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def without_timing(report_md) -> str:
    """report.md without the per-mode table's last column, s_per_frame (wall-clock)."""
    lines, in_modes = [], False
    for line in report_md.read_text().splitlines():
        if line.startswith("## "):
            in_modes = line == "## Reference modes"
        lines.append(line.rsplit("|", 2)[0] if in_modes and line.startswith("|") else line)
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sample_eval_two_processes_writes_the_one_process_report(tmp_path):
    from configs import dit as dit_configs

    syn, stage1, vq = tmp_path / "syn", tmp_path / "stage1", tmp_path / "vq"
    latents, dit = tmp_path / "latents", tmp_path / "dit"
    # 4 identities: 3 train clips, evaluated below (2 + 1 per process: an uneven split).
    run("data/synthetic.py", "--out", str(syn), "--identities", "4", "--clips", "1",
        "--seconds", "0.8", "--size", "64", "--seed", "2")  # fmt: skip
    run("data/preprocess.py", "--input", str(syn), "--out", str(stage1),
        "--landmarks", "sidecar", "--size", "32", "--margin", "0.3")  # fmt: skip

    save_initial_vqgan(stage1, vq)
    run("data/encode_latents.py", "--dataset", str(stage1), "--vqgan", str(vq),
        "--vqgan-masked", str(vq), "--out", str(latents), "--mask-variants", "1")  # fmt: skip
    config = dit_configs.get_config("testing")
    config.data.dir = str(latents)
    config.model.input_size = 8
    save_initial_dit(config, dit)

    common = ["sample.py", "--workdir", str(dit), "--eval", "--dataset", str(stage1),
              "--split", "train", "--synthetic", str(syn), "--max-frames", "4",
              "--steps", "2", "--metrics", ""]  # fmt: skip
    # Compile time dominates at this size: XLA's CPU backend without its expensive passes
    # (the same options as FAST_COMPILE_CPU), alike in both runs.
    fast = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE_CPU.items())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=4 {fast}"
    port = free_port()
    bare = ["--out", str(tmp_path / "two"), "--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", "2"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, *common, *bare, "--process_id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    # The one-process reference: 8 devices in one process.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {fast}"
    run(*common, "--out", str(tmp_path / "one"), env=env)
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one["settings"]["clips"] == 3
    assert [c["video"] for c in two["clips"]] == [c["video"] for c in one["clips"]]
    for report in (one, two):  # wall-clock, the one field that may differ
        for summary in (report.get("modes") or {}).values():
            summary.pop("s_per_frame")
    # Equal to float reassociation: each process's VQGAN codec splits a batch over its 4
    # devices where the one process splits it over 8 (data.latents.data_parallel_batches).
    assert close(two, one)
    assert without_timing(tmp_path / "two" / "report.md") == without_timing(
        tmp_path / "one" / "report.md"
    )
    # Every clip's side-by-side video, each written by the process that generated it.
    assert len(list((tmp_path / "two").glob("*.mp4"))) == 3
    assert "wrote" in logs[0] and "wrote" not in logs[1]


def close(a, b, rel: float = 1e-5) -> bool:
    """Nested report dicts equal, floats to `rel`."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-9, nan_ok=True)
    return a == b
