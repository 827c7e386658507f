"""The frame interpolator's training (stage 3, RIFE's IFNet on our own frames): triplets from
stage-1 records, RIFE's Laplacian loss, train.py's stage "vfi" (checkpoints, previews,
resume, one-line errors), load_model and the held-out PSNR against the trivial answers."""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from stage2_data import write_random_stage2, write_stage1_clip

from configs.vfi import get_config
from dithead_jax.data.sync_windows import window_starts
from dithead_jax.data.vfi_triplets import fitting_spans, triplet_dataset
from dithead_jax.models.ifnet import IFNet
from dithead_jax.training import loop, vfi_train
from dithead_jax.training.dit_step import FAST_COMPILE_CPU
from dithead_jax.training.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
S = 32
FRAMES = 12


def _clip(clip: int) -> np.ndarray:
    """(FRAMES, S, S, 3) uint8: a bright square moving 1 px right per frame on a gradient,
    and row 0 saying which frame it is (clip * 100 + 8 * k, the same across the row, so a
    horizontal flip keeps it readable; PNG records keep it exact)."""
    y, x = np.mgrid[:S, :S]
    frames = np.zeros((FRAMES, S, S, 3), np.uint8)
    for k in range(FRAMES):
        image = 40 + 2 * x + y
        image[10:18, 6 + k : 14 + k] = 220
        image[0] = clip * 100 + 8 * k
        frames[k] = image[..., None]
    return frames


def _frame_id(image: np.ndarray) -> int:
    return int(round(float(image[0, :, 0].mean()) * 255))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """Two 12-frame clips (32^2) as stage-1 records (train split)."""
    path = tmp_path_factory.mktemp("stage1")
    mask = np.zeros((FRAMES, S, S), np.uint8)
    for clip in range(2):
        write_stage1_clip(path, _clip(clip), mask, name=f"clip{clip}")
    return path


def test_triplet_starts_respect_videos_and_gaps():
    # Videos of 6 and 5 records; the second misses frame 2.
    index = {"start": np.array([0, 6]), "length": np.array([6, 5]),
             "frame_index": np.array([0, 1, 2, 3, 4, 5, 0, 1, 3, 4, 5])}  # fmt: skip
    np.testing.assert_array_equal(window_starts(index, 3), [0, 1, 2, 3, 8])
    frame_index, video_end = index["frame_index"], 6
    assert fitting_spans(0, (2, 3, 4), video_end, frame_index) == [2, 3, 4]
    assert fitting_spans(2, (2, 3, 4), video_end, frame_index) == [2, 3]  # the clip ends
    assert fitting_spans(8, (2, 3), 11, frame_index) == [2]  # frames 3, 4, 5 only


def test_triplets_are_frames_of_one_clip_at_their_time(stage1):
    # Unaugmented, in order: every (p, p+1, p+2) at t = 0.5, values in [0, 1].
    plain = triplet_dataset(stage1, batch_size=4, spans=(2,), random_flip=False,
                            random_reverse=False, shuffle=False, num_epochs=1)  # fmt: skip
    batches = list(plain)
    assert len(batches) == 5  # 2 clips x 10 starts = 20 triplets
    first = batches[0]
    assert {k: v.shape for k, v in first.items()} == {
        "img0": (4, S, S, 3),
        "gt": (4, S, S, 3),
        "img1": (4, S, S, 3),
        "timestep": (4,),
    }
    assert all(v.dtype == np.float32 for v in first.values())
    np.testing.assert_allclose(first["gt"][1], _clip(0)[2] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(first["timestep"], 0.5)
    values = np.concatenate([v.ravel() for v in first.values()])
    assert values.min() >= 0.0 and values.max() <= 1.0

    # Augmented, wider spans: still three frames of one clip, gt at t between the others.
    seen_t, reversed_rows, flipped_rows = set(), 0, 0
    augmented = triplet_dataset(stage1, batch_size=8, spans=(2, 3, 4), seed=3)
    for batch in itertools.islice(iter(augmented), 8):
        for i in range(8):
            a, m, b = (_frame_id(batch[k][i]) for k in ("img0", "gt", "img1"))
            t = float(batch["timestep"][i])
            assert a // 100 == m // 100 == b // 100  # one clip
            assert 2 <= abs(b - a) // 8 <= 4
            assert m - a == pytest.approx(t * (b - a), abs=1e-3), (a, m, b, t)
            seen_t.add(round(t, 3))
            reversed_rows += b < a
            # Frame k's square spans columns 6 + k .. 13 + k: centre 9.5 + k, or mirrored.
            centre = np.flatnonzero(batch["img0"][i][10:18].mean(axis=(0, 2)) > 0.8).mean()
            k = (a % 100) // 8
            assert centre in (9.5 + k, S - 1 - (9.5 + k))
            flipped_rows += centre != 9.5 + k
    assert seen_t == {0.25, 0.333, 0.5, 0.667, 0.75}
    assert 0 < reversed_rows < 64 and 0 < flipped_rows < 64


def _reference_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """RIFE's laplacian_pyramid written out directly: 5x5 binomial kernel as a 2-D
    correlation of the reflect-padded image, keep even pixels, zero-insert, blur x 4."""
    from scipy.ndimage import correlate

    k1 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    kernel = np.outer(k1, k1)

    def blur(x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        for b, c in itertools.product(range(x.shape[0]), range(x.shape[-1])):
            padded = np.pad(x[b, :, :, c], 2, mode="reflect")
            out[b, :, :, c] = correlate(padded, kernel, mode="constant")[2:-2, 2:-2]
        return out

    bands, current = [], image
    for _ in range(levels):
        down = blur(current)[:, ::2, ::2]
        up = np.zeros_like(current)
        up[:, ::2, ::2] = down
        bands.append(current - 4.0 * blur(up))
        current = down
    return bands


def test_lap_loss_is_rifes():
    rng = np.random.default_rng(0)
    a, b = (rng.uniform(size=(2, 32, 32, 3)) for _ in range(2))
    ours = jax.jit(vfi_train.laplacian_pyramid, static_argnums=1)(jnp.asarray(a, jnp.float32), 4)
    reference = _reference_pyramid(a, 4)
    assert [x.shape[1] for x in ours] == [32, 16, 8, 4]
    for x, y in zip(ours, reference, strict=True):
        np.testing.assert_allclose(np.asarray(x), y, atol=2e-6)
    other = _reference_pyramid(b, 4)
    expected = sum(np.abs(x - y).mean() for x, y in zip(reference, other, strict=True))
    lap_loss = jax.jit(vfi_train.lap_loss, static_argnums=2)
    got = lap_loss(jnp.asarray(a), jnp.asarray(b), 4)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # Band-pass only, as RIFE's: a uniform brightness offset costs nothing.
    assert float(lap_loss(jnp.asarray(a) + 0.1, jnp.asarray(a), 4)) < 1e-6


def _moving_square_batches(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    clip = _clip(0).astype(np.float32) / 255.0
    while True:
        p = rng.integers(0, FRAMES - 2, batch)
        yield {"img0": clip[p], "gt": clip[p + 1], "img1": clip[p + 2],
               "timestep": np.full((batch,), 0.5, np.float32)}  # fmt: skip


def test_trains_previews_resumes_and_loads(stage1, tmp_path):
    """train.py's code path (`build_task` + `loop.run`), twice on one task (one compile):
    4 steps, then a resume from the step-4 checkpoint on disk to 12. The batches are one
    fixed batch of the square moving 1 px per frame, so its loss must fall; the preview
    grid comes from the records."""
    config = get_config("testing")
    config.data.dir = str(stage1)
    config.train.log_every = 1
    config.train.image_every = 2
    config.train.progress = "none"
    config.train.learning_rate = 1e-2
    fixed = next(_moving_square_batches(8))
    task = vfi_train.build_task(
        config, batches=itertools.repeat(fixed), devices=jax.devices()[:1],
        compiler_options=FAST_COMPILE_CPU,
    )  # fmt: skip
    train = vfi_train.VFIRun.from_config(config).train
    workdir = tmp_path / "run"
    first = loop.run(task, dataclasses.replace(train, num_steps=4), workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]
    assert glob.glob(str(workdir / "events.out.tfevents.*"))  # scalars and the image grid
    result = loop.run(task, dataclasses.replace(train, num_steps=12), workdir)
    assert (result.start_step, result.final_step) == (4, 12)
    losses = [(first.losses | result.losses)[s] for s in range(1, 13)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    logged = read_jsonl(workdir / "metrics.jsonl")
    assert sorted(logged) == list(range(1, 13)) and all(logged[s]["psnr"] > 5 for s in logged)

    # load_model: the final checkpoint's IFNet, for inference; ema=True the average.
    model = vfi_train.load_model(workdir)
    assert isinstance(model, IFNet)
    graphdef, loaded = nnx.split(model)
    x0, x1 = jnp.asarray(fixed["img0"][:2]), jnp.asarray(fixed["img1"][:2])
    interpolate = jax.jit(lambda params: nnx.merge(graphdef, params)(x0, x1, 0.5))
    trained = jax.device_get(result.state.params)
    np.testing.assert_array_equal(np.asarray(interpolate(loaded)), interpolate(trained))
    ema = nnx.split(vfi_train.load_model(workdir, ema=True))[1]
    assert not np.allclose(np.asarray(interpolate(ema)), interpolate(loaded))

    # Every (p, p+1, p+2) of the records once, and the trivial answers beside the model's.
    scores = vfi_train.held_out_psnr(model, stage1, split="train", batch_size=8)
    assert scores["triplets"] == 20 and np.isfinite(scores["psnr_model"])
    assert scores["psnr_average"] > scores["psnr_repeat"] > 10  # a moving square


def test_train_py_runs_the_vfi_stage_and_a_bad_data_dir_is_one_line(tmp_path):
    missing = tmp_path / "missing"
    cmd = [sys.executable, "train.py", "--config", "configs/vfi.py:testing",
           f"--workdir={tmp_path / 'run'}", f"--config.data.dir={missing}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"train.py: error: {missing}: not a dataset (no dataset_info.json)"
    )
    assert "Traceback" not in done.stderr


def test_bad_inputs_are_one_line(stage1, tmp_path, monkeypatch):
    """What train.py prints as `train.py: error: <message>` (it catches these types)."""
    config = get_config("testing")
    config.data.dir = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as e:
        vfi_train.build_task(config)
    assert str(e.value) == f"{tmp_path / 'missing'}: not a dataset (no dataset_info.json)"
    config.data.dir = str(write_random_stage2(tmp_path / "latents", videos=1, frames=4))
    with pytest.raises(ValueError, match="stage-2 dataset.*frame interpolator needs a stage-1"):
        vfi_train.build_task(config)
    config.data.dir = ""
    with pytest.raises(ValueError, match="--config.data.dir must name stage-1 frame records"):
        vfi_train.build_task(config)
    # A released-weights file that is not there: find_weights names where it looked.
    monkeypatch.setenv("DITHEAD_WEIGHTS", str(tmp_path / "weights"))
    config.data.dir = str(stage1)
    config.init_weights = "rife_flownet.pkl"
    with pytest.raises(FileNotFoundError, match="rife_flownet.pkl") as e:
        vfi_train.build_task(config)
    assert str(tmp_path / "weights" / "rife_flownet.pkl") in str(e.value)


def test_init_weights_start_a_fresh_run(tmp_path):
    """A released-format flownet.pkl (PyTorch layouts, DDP `module.` keys) written from a
    random IFNet: a fresh run's params and EMA are exactly its weights."""
    import torch

    from dithead_jax.convert.rife_weights import torch_key

    config = get_config("testing")
    run = vfi_train.VFIRun.from_config(config)
    # In one jit (eager init compiles a sampler per weight shape), compiled fast.
    make = lambda: nnx.state(IFNet(run.model, rngs=nnx.Rngs(5)), nnx.Param)  # noqa: E731
    source = jax.jit(make, compiler_options=FAST_COMPILE_CPU)()
    state_dict = {}
    for path, variable in source.flat_state():
        key, value = torch_key(tuple(path)), np.asarray(variable.get_value())
        if key.endswith(".beta"):
            value = value.reshape(1, -1, 1, 1)
        elif value.ndim == 4 and (key.startswith("encode.cnn3.") or ".lastconv." in key):
            value = value[::-1, ::-1].transpose(2, 3, 0, 1)  # ConvTranspose2d (I, O, kh, kw)
        elif value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # Conv2d (O, I, kh, kw)
        state_dict[f"module.{key}"] = torch.from_numpy(np.array(value))
    torch.save(state_dict, tmp_path / "flownet.pkl")

    config.init_weights = str(tmp_path / "flownet.pkl")
    task = vfi_train.build_task(config, batches=iter(()), devices=jax.devices()[:1])
    for params in (task.state.params, task.state.ema_params):
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(source), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
