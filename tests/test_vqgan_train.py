"""Stage-1 trainer end to end on 8 simulated devices: frame records -> train_vqgan
(loss falls, checkpoints and TensorBoard events land) -> resume -> load_model."""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import numpy as np
import pytest
from stage2_data import write_stage1_clip

from configs import vqgan as vqgan_configs
from dithead_jax.config import DataConfig, SyntheticConfig
from dithead_jax.data.masks import lower_face_mask
from dithead_jax.models.vqgan import VQGAN
from dithead_jax.synthetic.dataset import render_synthetic_clip
from dithead_jax.training import loop, vqgan_train
from dithead_jax.training.dit_step import FAST_COMPILE_CPU

S = 32


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    """One synthetic 1 s clip (25 frames) of 32^2 faces as stage-1 records."""
    path = tmp_path_factory.mktemp("frames")
    clip = render_synthetic_clip(SyntheticConfig(identities=1, clips=1, seconds=1.0, size=S), 0, 0)
    frames = np.asarray(clip[0].frames, np.uint8)
    mask = np.stack([lower_face_mask(lm, S, DataConfig()) for lm in clip[0].landmarks])
    return str(write_stage1_clip(path, frames, mask))


def test_configs_parse():
    for variant in ("testing", "demo", "f4_16384"):
        run = vqgan_train.VQGANRun.from_config(vqgan_configs.get_config(variant))
        assert run.model.resolution == run.data.image_size
        assert run.target == "frames"
    demo = vqgan_train.VQGANRun.from_config(vqgan_configs.get_config("demo"))
    assert demo.model.resolution // demo.model.downsample_factor == 16 and not demo.use_lpips
    assert vqgan_train.VQGANRun.from_config(vqgan_configs.get_config("f4_16384")).use_lpips
    bad = vqgan_configs.get_config("testing")
    bad.loss.perceptual_weight = 1.0
    with pytest.raises(ValueError, match="use_lpips"):
        vqgan_train.VQGANRun.from_config(bad)
    bad = vqgan_configs.get_config("testing")
    bad.crop = 30  # not a multiple of f = 4
    with pytest.raises(ValueError, match="crop 30"):
        vqgan_train.VQGANRun.from_config(bad)
    bad = vqgan_configs.get_config("testing")
    bad.loss.mask_weight = -1.0
    with pytest.raises(ValueError, match="mask_weight must be >= 0"):
        vqgan_train.VQGANRun.from_config(bad)
    # One config serves both VQGANs: the masked one (no decoder kept) drops the weighting.
    masked = vqgan_configs.get_config("demo")
    masked.target = "masked"
    assert vqgan_configs.get_config("demo").loss.mask_weight > 0
    assert vqgan_train.VQGANRun.from_config(masked).loss.mask_weight == 0


def test_train_resume_and_load(frames_dir, tmp_path):
    """One task, two loop runs: `train_vqgan` is `loop.run(build_task(config), ...)`, and
    re-using the task lets the resumed run skip a second ~40 s compile of the step."""
    config = vqgan_configs.get_config("testing")
    config.data.dir = frames_dir
    config.loss.mask_weight = 2.0  # batches carry the records' masks through to the loss
    run = vqgan_train.VQGANRun.from_config(config)
    workdir = tmp_path / "run"
    # Two of the 8 simulated devices: still a sharded (data=2) run, but with 2 CPU cores
    # between them the other 6 would only add partitioning and thread overhead.
    devices = jax.devices()[:2]
    task = vqgan_train.build_task(config, devices=devices, compiler_options=FAST_COMPILE_CPU)

    result = loop.run(task, dataclasses.replace(run.train, num_steps=10), workdir)
    assert (result.start_step, result.final_step) == (0, 10)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert all(np.isfinite(losses))
    # Steps 1-10 are reconstruction only (disc_start 10): the loss must fall.
    assert np.mean(losses[6:9]) < 0.8 * np.mean(losses[:3]), losses
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps == [8, 10]
    assert glob.glob(str(workdir / "**" / "events.out.tfevents*"), recursive=True)
    age = np.asarray(jax.device_get(result.state.params["code_age"][...]))
    assert age.shape == (config.model.codebook_size,) and age.max() >= 1

    # Resume from step 10; steps 11-13 run the GAN branch (state.step >= disc_start).
    disc_before = jax.tree.leaves(jax.device_get(result.state.params["disc"]))
    resumed = loop.run(task, dataclasses.replace(run.train, num_steps=13), workdir)
    assert (resumed.start_step, resumed.final_step) == (10, 13)
    assert sorted(resumed.losses) == [11, 12, 13] and np.isfinite(resumed.losses[13])
    # The discriminator trains from disc_start on (before it its step is skipped).
    disc_after = jax.tree.leaves(jax.device_get(resumed.state.params["disc"]))
    assert any(not np.array_equal(a, b) for a, b in zip(disc_before, disc_after, strict=True))

    model = vqgan_train.load_model(workdir)
    assert isinstance(model, VQGAN)
    f = run.model.downsample_factor
    z = model.encode(np.zeros((2, S, S, 3), np.float32))
    assert z.shape == (2, S // f, S // f, run.model.embed_dim)
    assert model.decode(z).shape == (2, S, S, 3)
    trained = resumed.state.params["vqgan"]["quantize"]["codebook"][...]
    np.testing.assert_array_equal(model.quantize.codebook[...], jax.device_get(trained))
