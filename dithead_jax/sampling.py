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

from dithead_jax.config import CONDITION_LANDMARKS
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
    # (c,) E_m's own statistics for masked latents (E's for datasets made before them:
    # what those were normalised with; data.latents.masked_statistics)
    masked_latent_mean: np.ndarray
    masked_latent_std: np.ndarray
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
    from dithead_jax.data.latents import masked_statistics
    from dithead_jax.data.records import dataset_metadata
    from dithead_jax.training import dit_train, vqgan_train

    workdir = Path(workdir)
    config = _run_config(workdir)
    latents = dict(dataset_metadata(config.data.dir).get("provenance") or {})
    if "vqgan_workdir" not in latents:
        raise FileNotFoundError(f"{config.data.dir}: not a latent dataset (no VQGAN recorded)")
    stage1 = dataset_metadata(latents["stage1_dataset"])
    latents["stage1_provenance"] = stage1.get("provenance") or {}
    masked_mean, masked_std = masked_statistics(latents)
    return Models(
        dit=dit_train.load_model(workdir, config),
        dit_run=dit_train.DiTRun.from_config(config),
        vqgan=vqgan_train.load_model(latents["vqgan_workdir"]),
        vqgan_masked=vqgan_train.load_model(latents["vqgan_masked_workdir"]),
        latent_mean=np.asarray(latents["latent_mean"], np.float32),
        latent_std=np.asarray(latents["latent_std"], np.float32),
        masked_latent_mean=masked_mean,
        masked_latent_std=masked_std,
        latents=latents,
    )


def check_guidance(dit_run: Any, guidance: float) -> None:
    """ValueError unless the run can take classifier-free guidance `guidance` (1 = off):
    w != 1 needs the learned null audio, trained (diffusion.audio_dropout > 0)."""
    if guidance == 1:
        return
    if not (dit_run.model.null_audio and dit_run.diffusion.audio_dropout > 0):
        raise ValueError(
            f"guidance {guidance:g} needs a run trained with a null audio context "
            f"(model.null_audio=True, diffusion.audio_dropout > 0); this one has "
            f"null_audio={dit_run.model.null_audio}, "
            f"audio_dropout={dit_run.diffusion.audio_dropout:g}"
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


class _WithLandmarks(nnx.Module):
    """The DiT with each frame's landmarks carried in rows appended to its audio window.

    Every sampling order slices the audio per (frame, slot) (and guidance doubles it), so
    landmarks packed there follow their frame through all modes and orders without a
    second per-frame input in the samplers. (N, W + r, D) -> audio (N, W, D) and landmarks
    (N, n, 2); see `pack_landmarks`."""

    def __init__(self, dit: nnx.Module, window: int):
        self.dit, self.window = dit, window

    def __call__(self, x: jax.Array, t: jax.Array, packed: jax.Array, *args) -> jax.Array:
        n = len(CONDITION_LANDMARKS)
        flat = packed[:, self.window :].reshape(packed.shape[0], -1)[:, : 2 * n]
        landmarks = flat.reshape(-1, n, 2)
        return self.dit(x, t, packed[:, : self.window], *args, landmarks=landmarks)


def pack_landmarks(audio: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """audio (N, W, D), landmarks (N, n, 2) -> (N, W + ceil(2n / D), D) float32, the
    landmarks zero-padded into the extra rows (`_WithLandmarks` unpacks them)."""
    n, _, dim = audio.shape
    flat = np.asarray(landmarks, np.float32).reshape(n, -1)
    rows = -(-flat.shape[1] // dim)
    padded = np.zeros((n, rows * dim), np.float32)
    padded[:, : flat.shape[1]] = flat
    return np.concatenate([np.asarray(audio, np.float32), padded.reshape(n, rows, dim)], axis=1)


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
    guidance: float = 1.0,
    landmarks: np.ndarray | None = None,
) -> np.ndarray:
    """Face crops (N, S, S, 3) uint8 for masked crops (N, S, S, 3), audio windows (N, W, D)
    and one reference crop (S, S, 3) of the same person (frame 0's reference).
    `guidance`: classifier-free guidance scale on audio (1 = off; see `check_guidance`).
    `landmarks`: (N, 68, 2) crop pixels of the frames being generated, the ones the masked
    crops came from (a DiT with landmark_tokens needs them; DiffTalk conditions each frame
    on its own landmarks, so they do not depend on the reference mode)."""
    from dithead_jax.data.latents import condition_landmarks, make_encoder

    model = models.dit
    if models.dit_run.model.landmark_tokens:
        if landmarks is None:
            raise ValueError("this DiT has landmark_tokens: pass each frame's landmarks")
        audio = pack_landmarks(audio, condition_landmarks(landmarks, masked_frames.shape[1]))
        window = models.dit_run.model.audio_window
        model = _cached(models, ("with_landmarks",), lambda: _WithLandmarks(models.dit, window))

    check_guidance(models.dit_run, guidance)
    encode, decode = _frame_codec(models)
    encode_masked = _cached(models, ("encode_masked",), lambda: make_encoder(models.vqgan_masked))
    sampler = _cached(
        models,
        ("sample", steps, mode, eta, guidance),
        lambda: make_dit_sampler(
            model,
            make_schedule(models.dit_run.diffusion),
            num_steps=steps,
            eta=eta,
            mode=mode,
            prediction=models.dit_run.diffusion.prediction,
            guidance=guidance,
        ),
    )
    mean, std = models.latent_mean, models.latent_std
    masked_mean, masked_std = models.masked_latent_mean, models.masked_latent_std
    masked = (encode_masked(masked_frames) - masked_mean) / masked_std
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
