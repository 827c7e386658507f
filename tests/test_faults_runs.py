"""Faults around runs and checkpoints (issue 15): one writer per workdir, corrupt latest
checkpoints, non-finite weights, resuming another model, nothing to do, exit statuses.

In-process runs share one compiled DiT `testing` task on 8 CPU devices (as
tests/test_training.py does); train.py itself runs in subprocesses only where the exit
status or the lock between processes is the point, and those fail before compiling.
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from stage2_data import dit_testing_config, write_random_stage2

from dithead_jax import sharding
from dithead_jax.cli import EXIT_BAD_INPUT
from dithead_jax.models.dit import DiT
from dithead_jax.training import dit_step, dit_train, loop, workdir
from dithead_jax.training.checkpoint import Checkpointer, UnrestorableError
from dithead_jax.training.state import abstract_train_state, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _train_py(workdir_path: Path, *overrides: str) -> subprocess.Popen:
    # One device; LLVM -O0 compiles ~2.5x faster (as tests/test_train_script.py).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", f"{ROOT}/configs/dit.py:testing",
           "--workdir", str(workdir_path), "--config.train.progress=none", *overrides]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("train.py: error:")]


# ---------------------------------------------------------------------------------------
# One writer per workdir; nothing to do; exit statuses


def test_a_second_train_py_on_a_locked_workdir_exits_2_naming_the_holder(tmp_path):
    """Also, side by side: num_steps=0 exits 0 creating nothing, and a run whose first
    update overflows the weights exits 3 (EXIT_NON_FINITE) having saved nothing."""
    data = write_random_stage2(tmp_path / "records", videos=2, frames=24)
    overflow = _train_py(tmp_path / "overflow", f"--config.data.dir={data}",
                         "--config.train.learning_rate=1e39", "--config.train.num_steps=2",
                         "--config.train.checkpoint_every=1")  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dithead_jax.training import workdir; "
         f"lock = workdir.WorkdirLock({str(work)!r}).__enter__(); print('held', flush=True); "
         "time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        # Meanwhile: num_steps=0 on a fresh workdir is nothing to do, and creates nothing.
        fresh = tmp_path / "fresh"
        idle = _train_py(fresh, "--config.train.num_steps=0", "--config.data.dir=/nonexistent")
        second = _train_py(work, "--config.data.dir=/nonexistent")
        started = time.monotonic()
        _, err = second.communicate(timeout=120)
        assert second.returncode == EXIT_BAD_INPUT == 2, err[-2000:]
        (line,) = _errors(err)  # one line, no traceback
        assert f"pid {holder.pid})" in line and "in use by another train.py" in line, line
        assert "Traceback" not in err
        assert time.monotonic() - started < 60  # failed before the data or a compile
        assert sorted(p.name for p in work.iterdir()) == [workdir.LOCK_NAME]
        _, err = idle.communicate(timeout=120)
        assert idle.returncode == loop.EXIT_FINISHED == 0, err[-2000:]
        assert "Nothing to do" in err and not fresh.exists()
        _, err = overflow.communicate(timeout=300)
        assert overflow.returncode == loop.EXIT_NON_FINITE == 3, err[-2000:]
        (line,) = _errors(err)
        assert "at step 1 (the update made parameters non-finite" in line, line
        assert not list((tmp_path / "overflow" / "checkpoints").iterdir())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL leaves the file but not the flock: the next run takes over and says so.
    records = []
    handler = _Collect(records)
    py_logging.getLogger().addHandler(handler)
    try:
        with workdir.WorkdirLock(work):
            text = (work / workdir.LOCK_NAME).read_text()
            assert text.strip().endswith(f"pid {os.getpid()}")
    finally:
        py_logging.getLogger().removeHandler(handler)
    assert any("stale lock" in r and f"pid {holder.pid}" in r for r in records), records
    assert (work / workdir.LOCK_NAME).read_text() == ""  # released
    # Processes > 0 of a job take no lock; a second lock in one process is refused too.
    with (
        workdir.WorkdirLock(work, enabled=False),
        workdir.WorkdirLock(work),
        pytest.raises(workdir.WorkdirBusyError, match=rf"pid {os.getpid()}\)"),
    ):
        workdir.WorkdirLock(work).__enter__()


class _Collect(py_logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(py_logging.WARNING)
        self.into = into

    def emit(self, record: py_logging.LogRecord) -> None:
        self.into.append(record.getMessage())


# ---------------------------------------------------------------------------------------
# In-process runs of the DiT testing task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = write_random_stage2(tmp_path_factory.mktemp("records"), videos=2, frames=24)
    config = dit_testing_config(data)
    task = dit_train.build_task(config, compiler_options=dit_step.FAST_COMPILE_CPU)
    initial = jax.device_get(task.state)
    shardings = jax.tree.map(lambda a: a.sharding, task.abstract_state)
    run = dit_train.DiTRun.from_config(config)

    def fresh(**changes) -> loop.Task:
        return dataclasses.replace(
            task,
            state=jax.device_put(initial, shardings),
            batches=dit_train.dit_batches(run),
            **changes,
        )

    train = dataclasses.replace(run.train, num_steps=4, log_every=1, checkpoint_every=2,
                                image_every=1000, keep_checkpoints=3, progress="none")  # fmt: skip
    return config, run, fresh, train


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    """A finished 4-step run: checkpoints 2 and 4, and its losses."""
    _, _, fresh, train = setup
    work = tmp_path_factory.mktemp("saved")
    result = loop.run(fresh(), train, work)
    assert Checkpointer(work / "checkpoints").all_steps() == [2, 4]
    return work, result.losses


def _truncate_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts
             and p.stat().st_size > 0]  # fmt: skip
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim


def _break_metadata(step_dir: Path) -> Path:
    victim = step_dir / "state" / "_METADATA"
    victim.write_text(victim.read_text()[:40])
    return victim


def _break_data_state(step_dir: Path) -> Path:
    victim = step_dir / "data_state" / "metadata"
    victim.write_text(victim.read_text()[:-7] + "{{")
    return victim


@pytest.mark.parametrize("corrupt", [_truncate_array_file, _break_metadata, _break_data_state])
def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(
    setup, saved, corrupt, tmp_path
):
    _, _, fresh, train = setup
    source, losses = saved
    shutil.copytree(source / "checkpoints", tmp_path / "checkpoints")
    ckpts = tmp_path / "checkpoints"
    victim = corrupt(ckpts / "4")
    damaged = victim.read_bytes()
    records: list[str] = []
    handler = _Collect(records)
    py_logging.getLogger().addHandler(handler)
    try:
        result = loop.run(fresh(), train, tmp_path)
    finally:
        py_logging.getLogger().removeHandler(handler)
    assert result.start_step == 2 and result.final_step == 4
    # The same state and batches as the uninterrupted run: the data position came from 2.
    assert result.losses == {3: losses[3], 4: losses[4]}
    (skipped,) = [r for r in records if "Skipped checkpoint 4" in r]
    # The file is named: TensorStore names the data file, the JSON check the JSON file.
    assert str(victim.relative_to(tmp_path)) in skipped, skipped
    # Kept as it was for inspection, out of Orbax's way.
    assert (ckpts / "corrupt-4" / victim.relative_to(ckpts / "4")).read_bytes() == damaged
    assert Checkpointer(ckpts).all_steps() == [2, 4]  # Orbax ignores corrupt-4, saved 4 anew


# lr 1e39 is inf in float32: what a huge learning rate does to the update.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_an_update_to_inf_weights_is_not_applied_nor_saved(setup, saved, tmp_path):
    """lr 1e39 overflows the weights in one Adam step while the loss and gradient norm of
    that step are finite: the step keeps the old state, the loop stops before saving it
    (with a checkpoint due at every step), and the newest checkpoint is finite and resumes."""
    _, run, fresh, train = setup
    source, losses = saved
    shutil.copytree(source / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    huge = dataclasses.replace(train, learning_rate=1e39, checkpoint_every=1)
    # build_task's step with this optimizer (only the step compiles; the state is the same).
    rules = sharding.DIT_RULES
    mesh, batch_sharding = sharding.training_mesh(run.mesh, rules, train.global_batch_size)
    setup_ = abstract_train_state(
        lambda rngs: DiT(run.model, rngs=rngs), make_optimizer(huge), mesh=mesh, rules=rules
    )
    jitted = dit_step.jit_train_step(
        dit_step.make_train_step(setup_, run.diffusion, huge),
        setup_,
        batch_sharding,
        dit_step.FAST_COMPILE_CPU,
    )

    def overflowing(state, batch):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jitted(state, batch)

    with pytest.raises(loop.NonFiniteLossError, match=r"parameters non-finite.*step 2 in"):
        loop.run(fresh(train_step=overflowing), huge, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]
    ckpt.close()
    result = loop.run(fresh(), train, tmp_path)
    assert result.start_step == 2 and result.losses == {3: losses[3], 4: losses[4]}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state))


def test_resuming_a_different_model_names_the_fields(setup, saved, tmp_path):
    config, run, fresh, train = setup
    source, _ = saved
    shutil.copytree(source / "checkpoints", tmp_path / "checkpoints")
    other = json.loads(json.dumps(loop.config_dict(config)))
    other["model"]["hidden_size"] *= 2
    other["train"]["num_steps"] = 99  # may differ
    other["mesh"] = "fsdp"  # may differ
    with pytest.raises(workdir.ResumeMismatchError) as info:
        loop.run(fresh(config=other), train, tmp_path)
    message = str(info.value)
    hidden = config.model.hidden_size
    assert f"model.hidden_size: {hidden} in the checkpoint, {2 * hidden} now" in message
    assert "another --workdir" in message and "num_steps" not in message
    assert "\n" not in message and "mesh" not in message.split("--workdir")[0].split(":")[0]

    # Without a saved config to compare, every checkpoint fails to restore into the other
    # model: that is no corruption, so nothing is moved aside and the error says so.
    model = dataclasses.replace(run.model, hidden_size=2 * hidden)
    mesh, _ = sharding.training_mesh(run.mesh, sharding.DIT_RULES, train.global_batch_size)
    bigger = abstract_train_state(lambda rngs: DiT(model, rngs=rngs), make_optimizer(train),
                                  mesh=mesh, rules=sharding.DIT_RULES)  # fmt: skip
    task = fresh(config=None, abstract_state=bigger.abstract)
    with pytest.raises(UnrestorableError, match=r"no checkpoint in .* restores.*step 4"):
        loop.run(task, train, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]


def test_nothing_to_do_leaves_the_workdir_alone(setup, saved, tmp_path):
    _, _, fresh, train = setup
    source, _ = saved
    result = loop.run(fresh(), dataclasses.replace(train, num_steps=0), tmp_path / "new")
    assert result.final_step == 0 and not (tmp_path / "new").exists()
    shutil.copytree(source / "checkpoints", tmp_path / "old" / "checkpoints")
    result = loop.run(fresh(), dataclasses.replace(train, num_steps=3), tmp_path / "old")
    assert result.start_step == result.final_step == 4 and not result.losses
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["checkpoints"]


def test_guard_update_keeps_the_old_state_unless_everything_is_finite():
    """The one check both stages' steps (DiT and VQGAN) run on their update."""
    from dithead_jax.training.state import TrainState, guard_update

    def state(value: float) -> TrainState:
        tree = {"w": np.full((3,), value, np.float32), "b": np.zeros((2,), np.float32)}
        return TrainState(step=np.int32(1), params=tree, opt_state=(), ema_params=tree)

    old, one, nan = state(1.0), np.float32(1.0), np.float32(np.nan)
    cases = [(state(2.0), one, 1.0), (state(np.inf), one, 0.0), (state(np.nan), one, 0.0),
             (state(2.0), nan, 1.0)]  # fmt: skip
    for new, loss, ok in cases:
        kept, metrics = jax.jit(guard_update)(new, old, loss, one)
        assert float(metrics["params_finite"]) == ok
        expected = new if ok and np.isfinite(loss) else old
        np.testing.assert_array_equal(kept.params["w"], expected.params["w"])
