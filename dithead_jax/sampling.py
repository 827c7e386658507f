"""Video generation with a trained system: encode conditions, DDIM-sample, decode.

    models = load_models(dit_workdir)           # DiT + both VQGANs + latent statistics
    faces = generate_faces(models, masked, audio, reference, steps=50, mode="x0_same_step")

The chain of provenance: a DiT run's config names its stage-2 latents (`data.dir`); the
latents' metadata (written by data/encode_latents.py) names the two VQGAN runs that made
them, the stage-1 dataset, the audio features and the per-channel latent statistics the DiT
was trained with. So a DiT workdir is all sample.py needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax.diffusion.ddim import make_dit_sampler
from dithead_jax.diffusion.schedule import make_schedule


@dataclasses.dataclass
class Models:
    dit: nnx.Module
    dit_run: Any  # training.dit_train.DiTRun
    vqgan: nnx.Module  # E and D (frames)
    vqgan_masked: nnx.Module  # E_m (masked frames)
    latent_mean: np.ndarray  # (c,) the DiT sees (z - mean) / std
    latent_std: np.ndarray
    latents: dict[str, Any]  # stage-2 provenance (VQGAN runs, stage-1 dataset, its audio...)
    compiled: dict[tuple, Any] = dataclasses.field(default_factory=dict)


def _run_config(workdir: Path) -> Any:
    """The newest checkpoint's run config (JSON) as an ml_collections ConfigDict."""
    import ml_collections

    from dithead_jax.training.checkpoint import Checkpointer

    if not (workdir / "checkpoints").is_dir():  # the Checkpointer would create it
        raise FileNotFoundError(f"{workdir}: no checkpoints folder (train.py writes it)")
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint (train.py writes them)")
        config = ckpt.restore_config(step)
    finally:
        ckpt.close()
    return ml_collections.ConfigDict(config)


def load_models(workdir: str | os.PathLike) -> Models:
    """Everything generation needs, from a DiT run directory. Raises FileNotFoundError."""
    from dithead_jax.data.records import dataset_metadata
    from dithead_jax.training import dit_train, vqgan_train

    workdir = Path(workdir)
    config = _run_config(workdir)
    latents = dict(dataset_metadata(config.data.dir).get("provenance") or {})
    if "vqgan_workdir" not in latents:
        raise FileNotFoundError(f"{config.data.dir}: not a latent dataset (no VQGAN recorded)")
    stage1 = dataset_metadata(latents["stage1_dataset"])
    latents["stage1_provenance"] = stage1.get("provenance") or {}
    return Models(
        dit=dit_train.load_model(workdir, config),
        dit_run=dit_train.DiTRun.from_config(config),
        vqgan=vqgan_train.load_model(latents["vqgan_workdir"]),
        vqgan_masked=vqgan_train.load_model(latents["vqgan_masked_workdir"]),
        latent_mean=np.asarray(latents["latent_mean"], np.float32),
        latent_std=np.asarray(latents["latent_std"], np.float32),
        latents=latents,
    )


def _decoder(vqgan: nnx.Module):
    """A jitted D: latents (N, h, w, c) -> uint8 frames (N, S, S, 3); D quantises first."""
    graphdef, state = nnx.split(vqgan)

    @jax.jit
    def run(state, z):
        images = nnx.merge(graphdef, state).decode(z)
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return lambda z: np.asarray(run(state, z))


def _cached(models: Models, key: tuple, build):
    """Compiled pieces live as long as the loaded run: an evaluation over many clips (and
    its shuffled-audio control) must not re-trace the VQGANs and the sampler per clip."""
    if key not in models.compiled:
        models.compiled[key] = build()
    return models.compiled[key]


def _frame_codec(models: Models):
    """The frame VQGAN's compiled (E, D), built once per loaded run."""
    from dithead_jax.data.latents import make_encoder

    encode = _cached(models, ("encode",), lambda: make_encoder(models.vqgan))
    return encode, _cached(models, ("decode",), lambda: _decoder(models.vqgan))


def generate_faces(
    models: Models,
    masked_frames: np.ndarray,
    audio: np.ndarray,
    reference_frame: np.ndarray,
    *,
    steps: int = 50,
    mode: str = "x0_same_step",
    eta: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Face crops (N, S, S, 3) uint8 for masked crops (N, S, S, 3), audio windows (N, W, D)
    and one reference crop (S, S, 3) of the same person (frame 0's reference)."""
    from dithead_jax.data.latents import make_encoder

    encode, decode = _frame_codec(models)
    encode_masked = _cached(models, ("encode_masked",), lambda: make_encoder(models.vqgan_masked))
    sampler = _cached(
        models,
        ("sample", steps, mode, eta),
        lambda: make_dit_sampler(
            models.dit,
            make_schedule(models.dit_run.diffusion),
            num_steps=steps,
            eta=eta,
            mode=mode,
            prediction=models.dit_run.diffusion.prediction,
        ),
    )
    mean, std = models.latent_mean, models.latent_std
    masked = (encode_masked(masked_frames) - mean) / std
    reference = (encode(reference_frame[None]) - mean) / std
    latents = sampler(
        jnp.asarray(masked)[None],
        jnp.asarray(audio, jnp.float32)[None],
        jnp.asarray(reference),
        jax.random.key(seed),
    )[0]
    return decode(np.asarray(latents) * std + mean)


def reconstruct_faces(models: Models, frames: np.ndarray) -> np.ndarray:
    """D(E(frames)): the frame VQGAN's round trip, the best any DiT sample can look."""
    encode, decode = _frame_codec(models)
    return decode(encode(frames))


def describe(models: Models) -> str:
    return json.dumps({k: v for k, v in models.latents.items() if "latent_" not in k})
