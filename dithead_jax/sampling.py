"""Video generation with a trained system: encode conditions, DDIM-sample, decode.

    models = load_models(dit_workdir)           # DiT + both VQGANs + latent statistics
    faces = generate_faces(models, masked, audio, reference, steps=50, mode="x0_same_step")

The chain of provenance: a DiT run records its stage-2 latents (runs.record_latents; else
its config's `data.dir`); the latents' metadata (written by data/encode_latents.py) names
the two VQGAN runs that made them, the stage-1 dataset, the audio features and the
per-channel latent statistics the DiT was trained with, paths relative to itself. So a DiT
workdir is all sample.py needs; `dithead_jax.export` folds the chain into one folder.
Nothing here imports the trainers (runs.py restores only the weights).
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
    dit_run: Any  # runs.DiTSpec (model, diffusion, data): what sampling reads of the config
    vqgan: nnx.Module  # E and D (frames)
    vqgan_masked: nnx.Module  # E_m (masked frames)
    latent_mean: np.ndarray  # (c,) the DiT sees (z - mean) / std
    latent_std: np.ndarray
    # (c,) E_m's own statistics for masked latents (E's for datasets made before them:
    # what those were normalised with; data.latents.masked_statistics)
    masked_latent_mean: np.ndarray
    masked_latent_std: np.ndarray
    latents: dict[str, Any]  # stage-2 provenance (VQGAN runs, stage-1 dataset, its audio...)
    # What dubbing a new video needs, so that neither dataset has to be at hand: the
    # stage-1 crop settings (margin, landmarks...), the audio featurizer spec ("logmel" or
    # "wav2vec2:<dir or hub id>", a local dir resolved) and the face-crop size.
    stage1: dict[str, Any] = dataclasses.field(default_factory=dict)
    audio_features: str = "logmel"
    image_size: int = 0
    source: str = ""  # the workdir or exported folder it was loaded from
    compiled: dict[tuple, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.image_size and "image_size" in self.latents:
            self.image_size = int(self.latents["image_size"])
        if not self.stage1:
            self.stage1 = dict(self.latents.get("stage1_provenance") or {})


def load_models(path: str | os.PathLike) -> Models:
    """Everything generation needs, from a DiT run directory (train.py's workdir) or a
    folder `dithead_jax.export` wrote (it has a model_index.json). Raises
    FileNotFoundError / ValueError naming what is missing or wrong."""
    if (Path(path) / "model_index.json").is_file():
        from dithead_jax.export import load_export

        return load_export(path)
    return load_workdir(path)


def load_workdir(workdir: str | os.PathLike) -> Models:
    """A DiT run directory's Models: its EMA weights (no optimizer state is read), the two
    VQGANs and the statistics its latents dataset records, the stage-1 dataset's crop
    settings; recorded paths resolve relative to where they are recorded (runs.py)."""
    from dithead_jax import runs
    from dithead_jax.data.latents import masked_statistics
    from dithead_jax.data.records import dataset_path

    workdir = Path(workdir)
    config = runs.run_config(workdir)
    data_dir = runs.latents_dir(workdir, config)
    latents = dict(_metadata(data_dir, "latent dataset").get("provenance") or {})
    if "vqgan_workdir" not in latents:
        raise FileNotFoundError(f"{data_dir}: not a latent dataset (no VQGAN recorded)")
    # Recorded relative to the folder holding the metadata.json (data/latents.py).
    base = dataset_path(data_dir)
    for key in ("stage1_dataset", "vqgan_workdir", "vqgan_masked_workdir"):
        latents[key] = runs.resolve_recorded(latents[key], base)
    stage1 = _metadata(latents["stage1_dataset"], "stage-1 dataset")
    latents["stage1_provenance"] = stage1.get("provenance") or {}
    masked_mean, masked_std = masked_statistics(latents)
    return Models(
        dit=runs.load_dit(workdir, config),
        dit_run=runs.DiTSpec.from_config(config),
        vqgan=runs.load_vqgan(latents["vqgan_workdir"]),
        vqgan_masked=runs.load_vqgan(latents["vqgan_masked_workdir"]),
        latent_mean=np.asarray(latents["latent_mean"], np.float32),
        latent_std=np.asarray(latents["latent_std"], np.float32),
        masked_latent_mean=masked_mean,
        masked_latent_std=masked_std,
        latents=latents,
        audio_features=latents["stage1_provenance"].get("audio_features", "logmel"),
        source=str(workdir),
    )


def _metadata(path: str | os.PathLike, what: str) -> dict[str, Any]:
    from dithead_jax.data.records import dataset_metadata

    try:
        return dataset_metadata(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {what} there (its metadata.json is missing)") from None


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
