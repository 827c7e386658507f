"""Video generation with a trained system: encode conditions, DDIM-sample, decode.

    models = load_models(dit_workdir)           # DiT + both VQGANs + latent statistics
    faces = generate_faces(models, masked, audio, reference, options=InferenceOptions())
    stream = FaceStream(models, reference)       # the same, chunk by chunk (long videos)

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
    # A loaded interpolation.Interpolator for options.interpolate (None: looked up when
    # needed, see `interpolator`).
    interpolator: Any = None
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


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How faces are generated. Defaults are ours; `preset("paper")` is DiT-Head's setting.

    steps, solver, spacing, eta: the sampler (ddim.py, solvers.py); mode: the progressive
    reference; guidance: classifier-free guidance on audio (1 = off); dtype: the DiT's
    compute dtype (weights stay as trained); attention_impl: overrides the run's (None:
    the run's); max_batch: DiT rows per call (bounds memory; None: a whole call at once);
    chunk_frames: frames per sampler call (long clips continue chunk to chunk; bounds
    memory and the number of compiled programs); interpolate: video frame interpolation
    after the DiT, "off" | "smooth" | "half_rate" on the face crops here ("double" on the
    output frames: pipeline.py), see interpolation.py; interpolator: a VFI workdir or
    flownet.pkl (None: `<run>/../vfi`, else the released weights)."""

    steps: int = 50
    mode: str = "x0_same_step"
    solver: str = "ddim"
    spacing: str = "uniform"
    eta: float = 0.0
    guidance: float = 1.0
    dtype: str = "float32"
    attention_impl: str | None = None
    max_batch: int | None = 256
    chunk_frames: int = 64
    interpolate: str = "off"
    interpolator: str | None = None

    PRESETS = ("default", "paper", "fast")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> InferenceOptions:
        """`paper`: 250 DDIM steps with ADM's stride spacing (`leading`: `ddim250`) and the
        previous frame's noisy latent at the same step as reference (Sec. 3.4), which the
        parallel order runs in 250 calls; `fast`: the fewest solver steps that matched
        DDIM-250 within run-to-run noise on the demo (README "Solvers and steps")."""
        presets = {
            "default": {},
            "paper": dict(steps=250, mode="noisy_same_step", solver="ddim", spacing="leading"),
            # Measured (README "Solvers and steps"): DDIM-50 is the fewest steps within the
            # run-to-run noise of DDIM-250; the multistep solvers matched at no step count
            # tried; bf16 moved sync and PSNR by < 0.01 (2x the matmul peak on GPU / TPU).
            "fast": dict(steps=50, mode="x0_same_step", solver="ddim", dtype="bfloat16"),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {list(presets)}")
        return cls(**(presets[name] | overrides))

    def sampler_options(self, prediction: str) -> Any:
        from dithead_jax.diffusion.sampler import SamplerOptions

        return SamplerOptions(
            num_steps=self.steps, mode=self.mode, solver=self.solver, spacing=self.spacing,
            eta=self.eta, guidance=self.guidance, prediction=prediction,
            max_batch=self.max_batch,
        )  # fmt: skip


def _cached(models: Models, key: tuple, build):
    """Compiled pieces live as long as the loaded run: an evaluation over many clips (and
    its shuffled-audio control) must not re-trace the VQGANs and the sampler per clip."""
    if key not in models.compiled:
        models.compiled[key] = build()
    return models.compiled[key]


def vqgan_batch(image_size: int) -> int:
    """Frames per VQGAN call: the middle attention's scores over (S/4)^2 latent tokens grow
    as S^4 (32 frames of 256^2 crops: ~2 GiB per score matrix), so batches shrink with the
    crop to keep one call's scores near 0.5 GiB: 8 at 256^2, 64 at 128^2 and below."""
    return int(np.clip(8 * (256 / (image_size or 256)) ** 4, 1, 64))


def _frame_codec(models: Models):
    """The frame VQGAN's compiled (E, D), built once per loaded run."""
    from dithead_jax.data.latents import make_decoder, make_encoder

    batch = vqgan_batch(models.image_size)
    encode = _cached(models, ("encode",), lambda: make_encoder(models.vqgan, batch))
    return encode, _cached(models, ("decode",), lambda: make_decoder(models.vqgan, batch))


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


def inference_dit(models: Models, dtype: str, attention_impl: str | None) -> nnx.Module:
    """The run's DiT with its weights, computing in `dtype` with `attention_impl` (None:
    the run's): the trained config rebuilt with those two fields, the weights merged in."""
    from dithead_jax.models.dit import DiT
    from dithead_jax.models.layers import ATTENTION_IMPLS

    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {attention_impl!r}: choose from {ATTENTION_IMPLS}")
    cfg = models.dit_run.model
    changes = {"dtype": dtype} if dtype != cfg.dtype else {}
    if attention_impl is not None and attention_impl != cfg.attention_impl:
        changes["attention_impl"] = attention_impl
    if not changes:
        return models.dit
    new = dataclasses.replace(cfg, **changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(new, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(models.dit))


def _sampler(models: Models, options: InferenceOptions):
    """The run's compiled DiTSampler for `options` (cached per loaded run)."""
    from dithead_jax.diffusion.sampler import DiTSampler

    def build():
        model = inference_dit(models, options.dtype, options.attention_impl)
        if models.dit_run.model.landmark_tokens:
            model = _WithLandmarks(model, models.dit_run.model.audio_window)
        schedule = make_schedule(models.dit_run.diffusion)
        return DiTSampler(model, schedule, options.sampler_options(_prediction(models)))

    key = ("sampler", dataclasses.replace(options, chunk_frames=0))
    return _cached(models, key, build)


def _prediction(models: Models) -> str:
    return models.dit_run.diffusion.prediction


class FaceStream:
    """Generates one clip's faces chunk by chunk, as if in one piece.

        stream = FaceStream(models, reference_crop, options=InferenceOptions(), seed=0)
        for masked, audio, landmarks, masks in chunks:   # in clip order
            faces = stream(masked, audio, landmarks, masks)
        faces = stream.flush()                           # what interpolation held back

    The progressive reference carries over from each chunk's last frame to the next chunk's
    first (at every sampling step), and the noise is keyed by the global frame index, so
    the frames equal one whole-clip call (to float reassociation) while memory and the
    compiled programs depend on the chunk size only. With options.interpolate "smooth" or
    "half_rate" (interpolation.FacePost) a call returns the faces that are final, one frame
    behind (a frame needs its right neighbour), and `flush` the rest."""

    def __init__(
        self,
        models: Models,
        reference_frame: np.ndarray,
        *,
        options: InferenceOptions = InferenceOptions(),
        seed: int = 0,
    ):
        from dithead_jax.data.latents import make_encoder
        from dithead_jax.interpolation import FacePost

        check_guidance(models.dit_run, options.guidance)
        self.models, self.options = models, options
        self.sampler = _sampler(models, options)
        encode, self.decode = _frame_codec(models)
        batch = vqgan_batch(models.image_size)
        self.encode_masked = _cached(
            models, ("encode_masked",), lambda: make_encoder(models.vqgan_masked, batch)
        )
        z_r0 = (encode(np.asarray(reference_frame)[None]) - models.latent_mean) / models.latent_std
        self.references = jnp.asarray(z_r0, jnp.float32)  # (1, h, w, c), then (1, S, h, w, c)
        self.rng = jax.random.key(seed)
        self.frames_done = 0  # generated by the DiT (the sampler's noise index)
        self.frames_seen = 0  # received
        self.crop_shape = (0, 0, 3)  # (S, S, 3), from the first call
        self.post = None
        if options.interpolate in ("smooth", "half_rate"):
            self.post = FacePost(options.interpolate, interpolator(models, options.interpolator))
        elif options.interpolate not in ("off", "double"):
            raise ValueError(f"unknown interpolate mode {options.interpolate!r}")

    def __call__(
        self,
        masked_frames: np.ndarray,
        audio: np.ndarray,
        landmarks: np.ndarray | None = None,
        masks: np.ndarray | None = None,
    ) -> np.ndarray:
        """masked crops (C, S, S, 3) uint8, audio windows (C, W, D), landmarks (C, 68, 2)
        crop pixels (for a DiT with landmark_tokens), masks (C, S, S) uint8 lower-face
        alpha (for interpolate "smooth" / "half_rate") -> faces (C', S, S, 3) uint8: C
        without interpolation, else the ones that are final (see the class doc)."""
        from dithead_jax.data.latents import condition_landmarks

        models = self.models
        if models.dit_run.model.landmark_tokens:
            if landmarks is None:
                raise ValueError("this DiT has landmark_tokens: pass each frame's landmarks")
            size = masked_frames.shape[1]
            audio = pack_landmarks(audio, condition_landmarks(landmarks, size))
        count, first = len(masked_frames), self.frames_seen
        self.frames_seen += count
        self.crop_shape = masked_frames.shape[1:]
        if self.post is None:
            return self._generate(masked_frames, audio)
        if masks is None:
            raise ValueError(f"interpolate={self.options.interpolate!r} needs the masks")
        keep = np.arange(count)
        if self.options.interpolate == "half_rate":  # the clip's even frames
            keep = keep[(first + keep) % 2 == 0]
        faces: list[np.ndarray | None] = [None] * count
        for i, face in zip(keep, self._generate(masked_frames[keep], audio[keep]), strict=True):
            faces[i] = face
        return self.post.push(faces, masks)

    def flush(self) -> np.ndarray:
        """The faces interpolation held back (none without it)."""
        if self.post is None:
            return np.zeros((0, *self.crop_shape), np.uint8)
        return self.post.flush()

    def _generate(self, masked_frames: np.ndarray, audio: np.ndarray) -> np.ndarray:
        faces = [
            self._chunk(masked_frames[start : start + self.options.chunk_frames],
                        audio[start : start + self.options.chunk_frames])
            for start in range(0, len(masked_frames), self.options.chunk_frames)
        ]  # fmt: skip
        size = masked_frames.shape[1]
        return np.concatenate(faces) if faces else np.zeros((0, size, size, 3), np.uint8)

    def _chunk(self, masked_frames: np.ndarray, audio: np.ndarray) -> np.ndarray:
        models = self.models
        masked = self.encode_masked(masked_frames)
        masked = (masked - models.masked_latent_mean) / models.masked_latent_std
        latents, self.references = self.sampler(
            jnp.asarray(masked, jnp.float32)[None],
            jnp.asarray(audio, jnp.float32)[None],
            self.references,
            self.rng,
            self.frames_done,
        )
        self.frames_done += len(masked_frames)
        return self.decode(np.asarray(latents[0]) * models.latent_std + models.latent_mean)


def interpolator(models: Models, path: str | None):
    """The frame interpolator: `path`'s (interpolation.load_interpolator, loaded once), or
    with None the one attached to `models`, else the run's neighbour or the release."""
    from dithead_jax.interpolation import load_interpolator

    if path is None and models.interpolator is not None:
        return models.interpolator
    return _cached(models, ("interpolator", path), lambda: load_interpolator(path, models.source))


def generate_faces(
    models: Models,
    masked_frames: np.ndarray,
    audio: np.ndarray,
    reference_frame: np.ndarray,
    *,
    options: InferenceOptions | None = None,
    seed: int = 0,
    landmarks: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    **overrides: Any,
) -> np.ndarray:
    """Face crops (N, S, S, 3) uint8 for masked crops (N, S, S, 3), audio windows (N, W, D)
    and one reference crop (S, S, 3) of the same person (frame 0's reference).
    `options` (InferenceOptions; `overrides` replace its fields, e.g. steps=10,
    mode="fixed"); `landmarks`: (N, 68, 2) crop pixels of the frames being generated, the
    ones the masked crops came from (a DiT with landmark_tokens needs them; DiffTalk
    conditions each frame on its own landmarks, so they do not depend on the reference
    mode); `masks`: (N, S, S) uint8 lower-face alpha, for options.interpolate "smooth" /
    "half_rate". Runs as a FaceStream over chunks of options.chunk_frames."""
    options = dataclasses.replace(options or InferenceOptions(), **overrides)
    stream = FaceStream(models, reference_frame, options=options, seed=seed)
    return np.concatenate([stream(masked_frames, audio, landmarks, masks), stream.flush()])


def reconstruct_faces(models: Models, frames: np.ndarray) -> np.ndarray:
    """D(E(frames)): the frame VQGAN's round trip, the best any DiT sample can look."""
    encode, decode = _frame_codec(models)
    return decode(encode(frames))


def describe(models: Models) -> str:
    return json.dumps({k: v for k, v in models.latents.items() if "latent_" not in k})
