"""The stage-2 training loop in-process on 8 CPU devices (fsdp mesh): resume is exact,
non-finite losses stop the run cleanly, metrics and previews reach TensorBoard, and a few
steps make the DiT's output depend on the audio.

One task (one compile of init, step and preview) serves every run here: each run gets a
fresh copy of the initial state and a fresh data iterator; the loop itself is rebuilt.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from stage2_data import dit_testing_config, write_random_stage2

from dithead_jax.config import TrainConfig
from dithead_jax.training import dit_step, dit_train, loop
from dithead_jax.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = write_random_stage2(tmp_path_factory.mktemp("records"), videos=2, frames=24)
    config = dit_testing_config(data)
    config.mesh = "fsdp"
    task = dit_train.build_task(config, compiler_options=dit_step.FAST_COMPILE_CPU)
    initial = jax.device_get(task.state)
    shardings = jax.tree.map(lambda a: a.sharding, task.abstract_state)
    run = dit_train.DiTRun.from_config(config)

    def fresh(batches=None) -> loop.Task:
        return dataclasses.replace(
            task,
            state=jax.device_put(initial, shardings),
            batches=dit_train.dit_batches(run) if batches is None else batches,
        )

    return config, run, fresh, initial


def _train(run, **overrides) -> TrainConfig:
    base = dict(num_steps=4, log_every=1, checkpoint_every=2, image_every=2, keep_checkpoints=3,
                progress="none")  # fmt: skip
    return dataclasses.replace(run.train, **(base | overrides))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    _, run, fresh, _ = setup
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, loop.run(fresh(), _train(run), workdir)


def test_resume_gives_the_same_losses(setup, uninterrupted, tmp_path):
    _, run, fresh, _ = setup
    _, full = uninterrupted
    assert full.start_step == 0 and full.final_step == 4 and sorted(full.losses) == [1, 2, 3, 4]
    first = loop.run(fresh(), _train(run, num_steps=2), tmp_path)
    assert first.final_step == 2
    second = loop.run(fresh(), _train(run), tmp_path)  # a fresh state, replaced on resume
    assert second.start_step == 2 and sorted(second.losses) == [3, 4]
    for step in (1, 2):
        assert first.losses[step] == full.losses[step]
    for step in (3, 4):  # same weights, same batches (grain state), same noise (fold_in)
        assert second.losses[step] == full.losses[step]
    for a, b in zip(jax.tree.leaves(second.state), jax.tree.leaves(full.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keep_n_checkpoints(setup, tmp_path):
    _, run, fresh, _ = setup
    loop.run(fresh(), _train(run, checkpoint_every=1, image_every=100, keep_checkpoints=2),
             tmp_path)  # fmt: skip
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.restore_config(4)["mesh"] == "fsdp"
    # One data-iterator state for all processes (not grain's one file per process).
    saved = (tmp_path / "checkpoints" / "4" / "data_state").iterdir()
    assert {p.name for p in saved} == {"metadata", "commit_success.txt"}
    ckpt.close()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    _, run, fresh, _ = setup

    def poisoned():
        for i, batch in enumerate(dit_train.dit_batches(run), start=1):
            if i == 3:
                batch = dict(batch, audio=np.full_like(batch["audio"], np.nan))
            yield batch

    with pytest.raises(loop.NonFiniteLossError, match=r"at step 3.*Last good checkpoint: step 2"):
        loop.run(fresh(poisoned()), _train(run, image_every=100), tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]
    ckpt.close()


def _event_tags(logdir: Path) -> dict[str, set[int]]:
    """Scalar/image tags -> steps, read from TensorBoard event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, set[int]] = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, set()).add(event.step)
    return tags


def test_metrics_and_previews_reach_tensorboard(uninterrupted):
    workdir, _ = uninterrupted
    tags = _event_tags(workdir)
    for name in ("loss", "grad_norm", "lr", "param_norm"):
        assert tags[name] == {1, 2, 3, 4}, name
    for name in ("steps_per_sec", "examples_per_sec", "tflops_per_device", "mfu"):
        assert tags[name] == {2, 3, 4}, name  # step 1 compiles and is not timed
    assert tags["preview"] == {2, 4}
    assert "hparams/text_summary" in tags


def test_output_depends_on_audio_after_a_few_steps(setup, uninterrupted):
    config, run, _, initial = setup
    workdir, _ = uninterrupted
    trained = dit_train.load_model(workdir, config, ema=False)  # restored on 1 device
    rng = np.random.default_rng(0)
    size, c = run.model.input_size, run.model.latent_channels
    x = rng.normal(size=(2, size, size, 3 * c)).astype(np.float32)
    t = np.array([100, 700], np.int32)
    audio = rng.normal(size=(2, 2, run.model.audio_window, run.model.audio_dim)).astype(np.float32)
    graphdef, trained_params = nnx.split(trained)

    @jax.jit
    def audio_effect(params: nnx.State) -> tuple[jax.Array, jax.Array]:
        """Same input, two audio windows: largest change and the output's scale."""
        model = nnx.merge(graphdef, params)
        a, b = model(x, t, audio[0]), model(x, t, audio[1])
        return jax.numpy.abs(a - b).max(), jax.numpy.abs(a).max()

    change, _ = audio_effect(jax.tree.map(np.asarray, initial.params))
    assert float(change) == 0.0  # zero-initialised cross-attention output: audio is ignored
    change, scale = audio_effect(trained_params)
    assert float(change) > 1e-5 * float(scale), (float(change), float(scale))


def test_ema_warmup_follows_a_short_run_and_caps_at_the_decay():
    from dithead_jax.training.state import ema_decay_at, ema_update

    plain, warm = TrainConfig(ema_decay=0.99), TrainConfig(ema_decay=0.99, ema_warmup=True)
    assert ema_decay_at(5, plain) == 0.99
    np.testing.assert_allclose(ema_decay_at(0, warm), 0.1)
    np.testing.assert_allclose(ema_decay_at(10**6, warm), 0.99)
    # 100 updates towards a constant target from 0: warm-up keeps next to nothing of the
    # start (9! 100! / 109! ~ 1e-13), a plain 0.99 average still 37%.
    for config, left in ((plain, 0.99**100), (warm, 0.0)):
        ema = {"w": np.zeros(3, np.float32)}
        for step in range(100):
            ema = ema_update(ema, {"w": np.ones(3, np.float32)}, ema_decay_at(step, config))
        assert float(1 - ema["w"][0]) == pytest.approx(left, rel=1e-3, abs=1e-6)


def test_mask_weighted_loss_scales_the_error_inside_the_mask():
    from dithead_jax.config import DiffusionConfig
    from dithead_jax.diffusion import schedule as sch

    schedule = sch.make_schedule(DiffusionConfig())
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    lower_half = np.zeros((2, 4, 4), np.float32)
    lower_half[:, 2:] = 1.0
    error = rng.normal(size=latent.shape).astype(np.float32) * lower_half[..., None]
    batch = {"latent": latent, "mask": lower_half, "audio": np.zeros((2, 11, 33), np.float32)}
    batch["masked_latent"] = batch["reference_latent"] = np.zeros_like(latent)

    def exact_but_for_the_error(x, t, audio):
        # The model sees [z_t, z_m, z_r]; it knows z_0, hence the noise, and errs only
        # inside the mask.
        return sch.predict_eps_from_x0(schedule, x[..., :3], t, latent) + error

    def loss(weight):
        return float(dit_step.dit_loss(
            exact_but_for_the_error, batch, jax.random.key(1), schedule, "epsilon", weight
        )[0])  # fmt: skip

    # Weights 1 + 3 alpha over a half-covered grid have mean 2.5: 4 / 2.5 inside the mask.
    assert loss(3.0) == pytest.approx(1.6 * loss(0.0), rel=1e-5)
    with pytest.raises(ValueError, match="needs batches with a 'mask'"):
        dit_step.dit_loss(
            exact_but_for_the_error,
            {k: v for k, v in batch.items() if k != "mask"},
            jax.random.key(1),
            schedule,
            "epsilon",
            3.0,
        )
    config = dit_testing_config("")
    config.diffusion.mask_weight = -1.0
    with pytest.raises(ValueError, match="mask_weight must be >= 0"):
        dit_train.DiTRun.from_config(config)
