"""Generation options (sampling.InferenceOptions): frame chunks equal one piece at the faces
level, bf16 inference computes in bf16 and stays close to f32, attention_impl is honoured,
presets and their CLI flags."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx
from test_ddim import tiny_dit

from dithead_jax import runs, sampling
from dithead_jax.commands import sample as sample_cli
from dithead_jax.config import DataConfig, DiffusionConfig, VQGANConfig
from dithead_jax.models.vqgan import VQGAN

SIZE = 64  # face crops: the tiny DiT's 16x16 latents through an f=4 VQGAN


@pytest.fixture(scope="module")
def models() -> sampling.Models:
    """A loaded system of random weights (nothing here depends on training)."""
    graphdef, state, cfg = tiny_dit()
    vqgan = VQGAN(VQGANConfig.testing(resolution=SIZE), rngs=nnx.Rngs(0))
    vqgan_masked = VQGAN(VQGANConfig.testing(resolution=SIZE), rngs=nnx.Rngs(1))
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    return sampling.Models(
        dit=nnx.merge(graphdef, state),
        dit_run=runs.DiTSpec(cfg, DiffusionConfig(), DataConfig(image_size=SIZE)),
        vqgan=vqgan,
        vqgan_masked=vqgan_masked,
        latent_mean=zeros,
        latent_std=ones,
        masked_latent_mean=zeros,
        masked_latent_std=ones,
        latents={"image_size": SIZE},
    )


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(0)
    masked = rng.integers(0, 256, (7, SIZE, SIZE, 3), np.uint8)
    audio = rng.standard_normal((7, 11, 33)).astype(np.float32)
    return masked, audio, masked[0]


def test_faces_in_frame_chunks_equal_one_piece(models, clip):
    masked, audio, reference = clip
    options = sampling.InferenceOptions(steps=3)
    whole = sampling.generate_faces(models, masked, audio, reference, options=options, seed=4)
    chunked = sampling.generate_faces(
        models, masked, audio, reference, options=options, chunk_frames=3, seed=4
    )
    stream = sampling.FaceStream(models, reference, options=options, seed=4)
    streamed = np.concatenate([stream(masked[:4], audio[:4]), stream(masked[4:], audio[4:])])
    assert whole.shape == masked.shape and whole.std() > 1
    for got in (chunked, streamed):  # uint8 after D: at most one level from float reorder
        assert np.abs(got.astype(int) - whole).max() <= 1


def test_bf16_inference_computes_in_bf16_and_stays_close(models, clip):
    masked, audio, reference = clip
    f32 = sampling.InferenceOptions(steps=3)
    bf16 = dataclasses.replace(f32, dtype="bfloat16")
    sampler = sampling._sampler(models, bf16)
    shape = jax.ShapeDtypeStruct
    hlo = sampler.lower(
        shape((1, 7, 16, 16, 3), np.float32),
        shape((1, 7, 11, 33), np.float32),
        shape((1, 16, 16, 3), np.float32),
    ).as_text()
    dots = re.findall(r"stablehlo.dot_general.*", hlo)
    assert dots and all("bf16" in d for d in dots)
    faces = {
        name: sampling.generate_faces(models, masked, audio, reference, options=o).astype(int)
        for name, o in (("f32", f32), ("bf16", bf16))
    }
    difference = np.abs(faces["bf16"] - faces["f32"]).mean()
    assert 0 < difference < 8, difference  # bf16's 8-bit mantissa, not a different sample


def test_attention_impl_is_honoured(models):
    dit = sampling.inference_dit(models, "float32", "xla")
    found = {m.implementation for _, m in nnx.iter_graph(dit) if hasattr(m, "implementation")}
    assert found == {"xla"}
    assert sampling.inference_dit(models, "float32", None) is models.dit
    with pytest.raises(ValueError, match="flash"):
        sampling.inference_dit(models, "float32", "flash")


def test_presets_and_flags():
    paper = sampling.InferenceOptions.preset("paper")
    assert (paper.steps, paper.mode, paper.solver, paper.spacing) == (
        250, "noisy_same_step", "ddim", "leading"
    )  # fmt: skip
    args = sample_cli.parse(["--model", "m", "--eval", "--dataset", "d", "--out", "o",
                             "--preset", "paper", "--steps", "100"])  # fmt: skip
    assert (args.inference.steps, args.inference.mode, args.modes) == (
        100, "noisy_same_step", "noisy_same_step"
    )  # fmt: skip
    fast = sample_cli.parse(["--model", "m", "--eval", "--dataset", "d", "--out", "o",
                             "--preset", "fast", "--dtype", "bfloat16"]).inference  # fmt: skip
    assert fast == sampling.InferenceOptions.preset("fast", dtype="bfloat16")
    with pytest.raises(SystemExit):
        sample_cli.parse(["--model", "m", "--eval", "--dataset", "d", "--out", "o",
                          "--preset", "slow"])  # fmt: skip
    with pytest.raises(ValueError, match="unknown preset"):
        sampling.InferenceOptions.preset("slow")
    video = ["--model", "m", "--video", __file__, "--audio", __file__, "--out", "o.mp4"]
    assert sample_cli.parse([*video, "--interpolate", "double"]).inference.interpolate == "double"
    evaluation = ["--model", "m", "--eval", "--dataset", "d", "--out", "o"]
    args = sample_cli.parse([*evaluation, "--interpolate", "off,smooth,half_rate"])
    assert args.interpolate == ("off", "smooth", "half_rate")
    for bad in ([*video, "--interpolate", "off,smooth"], [*evaluation, "--interpolate", "double"],
                [*video, "--interpolate", "triple"]):  # fmt: skip
        with pytest.raises(SystemExit):
            sample_cli.parse(bad)
