"""train.py as 2 processes x 4 CPU devices on jax.distributed (localhost, gloo), against
1 process x 8 devices: the same losses, disjoint input rows, checkpoints that move between
process counts and meshes (data-iterator state included), and preemption agreed by both
processes.

Runs are shared between assertions (each launch imports jax and may compile), in order:

    DiT  U  2 processes, dp, steps 1-8 uninterrupted       the reference
         S  2 processes, dp, SIGTERM to process 1 only     both save step s, exit 75
         R  2 processes, dp, resumes S to step 8           == U, bit for bit
         X  1 process, fsdp, resumes U's checkpoint 4      ~= U (<= 1e-5 relative)
         Y  2 processes, dp, resumes X's checkpoint 6      ~= U
    VQGAN   1 process vs 2 processes, dp, steps 1-3       ~= each other

All launches share one persistent compilation cache, so U's program serves S, R and Y.
Losses are read from each run's `metrics.jsonl` (full precision, written by process 0).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from stage2_data import write_random_stage2, write_stage1_clip

from dithead_jax import distributed
from dithead_jax.cli import initialize_distributed
from dithead_jax.training.loop import EXIT_PREEMPTED
from dithead_jax.training.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from multihost import Launch  # noqa: E402

# A hang guard, not a speed test: under a loaded CI (two xdist workers on 2 cores) one
# launch compiling a VQGAN and its discriminator has taken over 180 s.
TIMEOUT = 600.0
COMMON = ("--config.train.log_every=1", "--config.train.image_every=1000000",
          "--config.train.progress=none")  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The launches' environment: fast CPU compiles, one compilation cache for all."""
    cache = tmp_path_factory.mktemp("jax_cache")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    return env


def launch(env, workdir: Path, config: str, *flags: str, processes: int = 2) -> Launch:
    args = ["--config", f"{ROOT}/configs/{config}", "--workdir", str(workdir), *COMMON, *flags]
    # One process: plain train.py, as a user runs it on one machine (no jax.distributed).
    return Launch(
        args, processes=processes, devices=8 // processes, env=env, distributed=processes > 1
    )


def finish(run: Launch, want: int = 0) -> list[str]:
    codes = run.wait(timeout=TIMEOUT)
    texts = [run.text(i) for i in range(len(codes))]
    assert codes == [want] * len(codes), "\n".join(t[-3000:] for t in texts)
    return texts


def losses(workdir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_jsonl(workdir / "metrics.jsonl").items()}


def steps_saved(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def copy_checkpoint(src: Path, step: int, dst: Path) -> Path:
    shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))
    return dst


def assert_close(got: dict[int, float], want: dict[int, float], steps: range, rtol: float):
    for step in steps:
        assert step in got, f"step {step} missing: {sorted(got)}"
        np.testing.assert_allclose(got[step], want[step], rtol=rtol, err_msg=f"step {step}")


def test_distributed_requested():
    requested = distributed.distributed_requested
    assert not requested({})
    assert requested({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert requested({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    assert not requested({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
    assert requested({"OMPI_COMM_WORLD_SIZE": "2"})
    assert requested({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not requested({"TPU_WORKER_HOSTNAMES": "a"})
    assert not requested({"DITHEAD_DISTRIBUTED": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert requested({"DITHEAD_DISTRIBUTED": "1"})
    # The classes jax.distributed.initialize() consults; mpi4py is opt-in only there too.
    names = {env.__name__ for env in distributed._cluster_envs()}
    assert {"GceTpuCluster", "GkeTpuCluster", "SlurmCluster", "OmpiCluster"} <= names
    assert "K8sCluster" in names and "Mpi4pyCluster" not in names


def test_bare_launch_flags(capsys):
    assert not distributed.check_flags(None, None, None)
    assert distributed.check_flags("127.0.0.1:1234", 2, 1)
    bad = [
        (("127.0.0.1:1234", None, None), "go together"),
        (("127.0.0.1:1234", 2, 2), "not in"),
        (("127.0.0.1", 2, 0), "HOST:PORT"),
    ]
    for flags, message in bad:
        with pytest.raises(ValueError, match=message):
            distributed.check_flags(*flags)
    # The entry points turn it into one line and status 2, before touching jax.distributed.
    with pytest.raises(SystemExit) as exit_info:
        initialize_distributed("train.py", "127.0.0.1:1234", 2, None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: --coordinator_address") and "\n" not in err


def test_dit_two_processes(tmp_path, env):
    data = write_random_stage2(tmp_path / "records", videos=2, frames=24)
    dit = ("dit.py:testing", f"--config.data.dir={data}", "--config.train.num_steps=8")

    # U: the uninterrupted 2-process run; each process reads its half of every batch.
    u = tmp_path / "u"
    texts = finish(launch(env, u, *dit, "--config.train.checkpoint_every=4"))
    for i, text in enumerate(texts):
        assert f"Process {i} reads rows [{4 * i}, {4 * i + 4}) of each global batch of 8" in text
    ref = losses(u)
    assert sorted(ref) == list(range(1, 9)) and steps_saved(u) == [4, 8]

    # S: SIGTERM to process 1 alone; JAX's preemption notice stops both at one step.
    s_dir = tmp_path / "s"
    run = launch(env, s_dir, *dit, "--config.train.checkpoint_every=1000")
    deadline = time.monotonic() + TIMEOUT
    while 2 not in (losses(s_dir) if (s_dir / "metrics.jsonl").exists() else {}):
        assert time.monotonic() < deadline and all(p.poll() is None for p in run.procs)
        time.sleep(0.2)
    run.signal(1, signal.SIGTERM)
    texts = finish(run, want=EXIT_PREEMPTED)
    saved = [
        int(re.search(r"Preempted: checkpoint of step (\d+) saved", t).group(1)) for t in texts
    ]
    stop = saved[0]
    assert saved == [stop, stop] and 2 <= stop < 8 and steps_saved(s_dir) == [stop]
    assert_close(losses(s_dir), ref, range(1, stop + 1), rtol=0)

    # R: resumes on the same layout and continues bit for bit (data position included).
    finish(launch(env, s_dir, *dit))
    got = losses(s_dir)
    assert [got[k] for k in range(stop + 1, 9)] == [ref[k] for k in range(stop + 1, 9)]

    # X: U's step-4 checkpoint (2 processes, dp) in 1 process with 8 devices under fsdp.
    x = copy_checkpoint(u, 4, tmp_path / "x")
    finish(launch(env, x, *dit, "--config.mesh=fsdp", "--config.train.checkpoint_every=2",
                  processes=1))  # fmt: skip
    assert_close(losses(x), ref, range(5, 9), rtol=1e-5)

    # Y: X's step-6 checkpoint (1 process, fsdp) back in 2 processes under dp.
    y = copy_checkpoint(x, 6, tmp_path / "y")
    finish(launch(env, y, *dit))
    assert_close(losses(y), ref, range(7, 9), rtol=1e-5)


def _write_random_stage1(path: Path, size: int = 32, frames: int = 20) -> Path:
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)  # noqa: E731
    mask = rng.integers(0, 256, (frames, size, size), dtype=np.uint8)
    return write_stage1_clip(path, image(), mask, masked_frames=image(), name="v0")


def test_vqgan_two_processes_match_one(tmp_path, env):
    data = _write_random_stage1(tmp_path / "frames")
    vqgan = ("vqgan.py:testing", f"--config.data.dir={data}", "--config.train.num_steps=3",
             "--config.train.checkpoint_every=1000")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch(env, one, *vqgan, processes=1))
    texts = finish(launch(env, two, *vqgan))
    assert "Process 1 reads rows [4, 8) of each global batch of 8" in texts[1]
    assert_close(losses(two), losses(one), range(1, 4), rtol=1e-5)
