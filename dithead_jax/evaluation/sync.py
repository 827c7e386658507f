"""LSE-D / LSE-C lip-sync scores (Prajwal et al. 2020), as Wav2Lip's evaluation computes them.

Wav2Lip's `evaluation/scores_LSE` scripts run joonson/syncnet_python's
`SyncNetInstance.evaluate` with `vshift=15`, `batch_size=20` on each video; LSE-D is its
"min dist" and LSE-C its "confidence". The procedure, step by step (ours does the same):

1. Frames: each frame is a face crop (BGR from cv2, via JPEG files written by ffmpeg),
   `cv2.resize`d to 224 x 224 (bilinear), fed as raw 0..255 floats.
2. Audio: the video's track as 16 kHz mono int16 (`ffmpeg -ac 1 -acodec pcm_s16le -ar
   16000`), NOT rescaled to [-1, 1]; `python_speech_features.mfcc` with its defaults:
   25 ms windows every 10 ms (100 Hz), no window function, pre-emphasis 0.97, 512-point
   FFT, 26 mel filters, 13 coefficients, lifter 22, c0 replaced by log frame energy.
   Only c0 depends on the audio's scale (log energy shifts by 2 log k), hence the int16.
3. Length: L = min(#frames, floor(#samples / 640)) (640 samples = one 25 fps frame);
   W = L - 5 windows (the original's `lastframe`; one fewer than would fit).
4. Window i in [0, W): video frames i..i+4 -> lip embedding v_i; MFCC steps 4i..4i+19
   -> audio embedding a_i (1024-d each).
5. For each offset k in [0, 2 * vshift]: d[i, k] = ||v_i - a_{i + k - vshift} + 1e-6||_2
   (`torch.nn.functional.pairwise_distance`, eps 1e-6 added to the difference), where an
   audio index outside [0, W) is a zero vector (the original zero-pads the audio features).
6. m[k] = mean_i d[i, k]. LSE-D = min_k m[k]; LSE-C = median_k m[k] - min_k m[k] (torch's
   median: the lower middle value); AV offset = vshift - argmin_k m[k] frames (positive:
   video window i matches audio window i - offset, i.e. the video lags the audio).

What we feed instead of syncnet_python's crops: syncnet_python's `run_pipeline.py` (which
Wav2Lip's real-video script runs first) detects faces with S3FD, tracks them (tracks shorter
than 100 frames are dropped), median-smooths the boxes and crops a square of side 1.4 x the
detection box, centred 0.2 box sides below the box centre (chin and some neck in, forehead
partly out), padding with grey 110, then writes a 224 x 224 XVID video. We already have
the generated face crops, so `lse_scores` takes them directly: our 256 x 256 RGB crops
(square, side 1.7 x the landmark extent, centred 8% of the side above the landmark centre:
more forehead, less neck than SyncNet's crop), resized to 224 x 224 by `cv2.resize`
(bilinear, uint8) and converted RGB -> BGR; the MFCCs are `python_speech_features.mfcc`'s.
No JPEG / MPEG-4 round trip and no detection or tracking, so scores are not bit-comparable
with numbers from re-encoded videos; they are comparable between methods scored this way.
To score other methods' videos (the paper's Table 1 rows) the same way, crop their frames
with the same boxes first. To reproduce the published protocol exactly instead (DiT-Head
scored "padded face-crop videos"), write the crops as a 25 fps video with its audio and run
syncnet_python's `run_pipeline.py` + Wav2Lip's `calculate_scores_real_videos.py` on it.

The network was trained on cv2 images, so channel order is BGR even though the papers
speak of RGB crops; `lse_scores` takes RGB (our loaders' order) and flips it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import python_speech_features
from flax import nnx
from jaxtyping import Array, Float, UInt8

from dithead_jax.convert.syncnet_weights import load_syncnet
from dithead_jax.data.sources import to_pcm16
from dithead_jax.models.syncnet import LIP_FRAMES, LIP_SIZE, MFCC_STEPS, SyncNet

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MFCC_PER_FRAME = 4  # 100 Hz MFCC steps per 25 fps frame
VSHIFT = 15
BATCH_SIZE = 20
PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance's default eps


# ---------------------------------------------------------------------------------------
# Audio: int16 samples -> python_speech_features MFCCs; frames: cv2.resize to 224, BGR
# ---------------------------------------------------------------------------------------


def mfcc(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(steps, 13) float64 MFCCs of (N,) samples at their own scale (int16 values, as
    syncnet_python passes them): `python_speech_features.mfcc` with its defaults, the call
    syncnet_python makes; steps = 1 + ceil((N - 400) / 160), the last frame zero-padded."""
    return python_speech_features.mfcc(np.asarray(samples).reshape(-1), sample_rate)


def audio_to_int16(audio: np.ndarray) -> np.ndarray:
    """int16 samples as ffmpeg's pcm_s16le would write them (our loaders return float32 in
    [-1, 1]); the same rule stage 1 stores its speech with (data/sources.py)."""
    return to_pcm16(audio)


def syncnet_frames(frames: np.ndarray, size: int = LIP_SIZE) -> np.ndarray:
    """(T, H, W, 3) RGB uint8 -> (T, size, size, 3) BGR uint8: `cv2.resize(frame, (size,
    size))` (INTER_LINEAR) of each frame, then the channel flip (the network saw cv2's
    BGR images)."""
    resized = np.stack([cv2.resize(frame, (size, size)) for frame in frames])
    return np.ascontiguousarray(resized[..., ::-1])


# ---------------------------------------------------------------------------------------
# Embeddings, distances, scores
# ---------------------------------------------------------------------------------------


def num_windows(num_frames: int, num_samples: int) -> int:
    """syncnet_python's `lastframe`: min(frames, samples // 640) - 5 (may be <= 0)."""
    return min(num_frames, num_samples // SAMPLES_PER_FRAME) - LIP_FRAMES


def mfcc_windows(mfcc_steps: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(len(starts), 13, 20) float32: MFCC steps 4s..4s+19 for each window start s,
    coefficients as rows (the original's (1, 13, 20) audio input)."""
    index = MFCC_PER_FRAME * np.asarray(starts)[:, None] + np.arange(MFCC_STEPS)[None, :]
    return np.transpose(mfcc_steps[index], (0, 2, 1)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    frames: UInt8[Array, "b+4 224 224 3"],
    audio: Float[Array, "b 13 20"],
) -> tuple[Float[Array, "b e"], Float[Array, "b e"]]:
    model = nnx.merge(graphdef, state)
    x = frames.astype(jnp.float32)  # raw 0..255 BGR, as syncnet_python feeds them
    b = audio.shape[0]
    windows = jnp.stack([x[t : t + b] for t in range(LIP_FRAMES)], axis=1)  # (b, 5, ...)
    return model.embed_lips(windows), model.embed_audio(audio)


def syncnet_embeddings(
    model: SyncNet, frames: np.ndarray, audio: np.ndarray, batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Lip and audio embeddings (W, E) float32 of every window (steps 3-4 of the module doc).

    frames: (T, H, W, 3) RGB uint8 face crops at 25 fps; audio: (N,) 16 kHz float in
    [-1, 1] or int16. Batches have a fixed size (the last one edge-padded) so the network
    compiles once.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise TypeError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.dtype} {frames.shape}")
    samples = audio_to_int16(audio)
    count = num_windows(len(frames), len(samples))
    if count <= 0:
        raise ValueError(
            f"too short for SyncNet: {len(frames)} frames, {len(samples)} samples "
            f"(needs at least {LIP_FRAMES + 1} frames and audio for them)"
        )
    steps = mfcc(samples, SAMPLE_RATE)
    frames = syncnet_frames(frames[: count + LIP_FRAMES - 1])  # the frames windows read
    graphdef, state = nnx.split(model)
    lips, auds = [], []
    last_frame = count - 1 + LIP_FRAMES - 1  # the last frame of the last window
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        starts = np.minimum(start + np.arange(batch_size), count - 1)  # edge-pad the tail
        frame_index = np.minimum(start + np.arange(batch_size + LIP_FRAMES - 1), last_frame)
        lip, aud = _embed_batch(graphdef, state, frames[frame_index], mfcc_windows(steps, starts))
        lips.append(np.asarray(lip[:n]))
        auds.append(np.asarray(aud[:n]))
    return np.concatenate(lips), np.concatenate(auds)


@functools.partial(jax.jit, static_argnames="vshift")
def sync_distances(
    video: Float[Array, "w e"], audio: Float[Array, "w e"], vshift: int = VSHIFT
) -> Float[Array, "w k"]:
    """d[i, k] = ||video_i - audio_{i + k - vshift} + 1e-6||, audio zero outside [0, w)."""
    w = video.shape[0]
    padded = jnp.pad(jnp.asarray(audio, jnp.float32), ((vshift, vshift), (0, 0)))
    video = jnp.asarray(video, jnp.float32)

    def at_offset(k: jax.Array) -> jax.Array:
        shifted = jax.lax.dynamic_slice_in_dim(padded, k, w)
        return jnp.linalg.norm(video - shifted + PAIRWISE_EPS, axis=-1)

    # One offset at a time: (w, e) live instead of (2 * vshift + 1, w, e).
    return jax.lax.map(at_offset, jnp.arange(2 * vshift + 1)).T


def scores_from_distances(dists: np.ndarray, vshift: int = VSHIFT) -> dict[str, Any]:
    """Step 6: LSE-D, LSE-C and the AV offset from the (W, 2 * vshift + 1) distances."""
    mean = np.asarray(jnp.mean(jnp.asarray(dists, jnp.float32), axis=0))
    return scores_from_mean_distances(mean, int(dists.shape[0]), vshift)


def unavailable(reason: str) -> dict[str, Any]:
    """The result when the scorer cannot run (no weights): no numbers, and why."""
    return {"status": "unavailable", "lse_d": None, "lse_c": None, "offset": None, "reason": reason}


class SyncScorer:
    """LSE-D / LSE-C for many videos with one network.

    model: a `SyncNet`; None loads `weights_path`, or `syncnet_v2.model` via `find_weights`
    ($DITHEAD_WEIGHTS); if that file is missing every call returns `unavailable(...)`
    naming the paths looked at.
    """

    def __init__(
        self,
        model: SyncNet | None = None,
        *,
        vshift: int = VSHIFT,
        batch_size: int = BATCH_SIZE,
        weights_path: str | os.PathLike | None = None,
    ):
        self.vshift = vshift
        self.batch_size = batch_size
        self.name = "syncnet_v2"
        self.reason: str | None = None
        if model is None:
            try:
                model = load_syncnet(weights_path)
            except FileNotFoundError as e:
                self.reason = f"SyncNet weights missing: {e}"
        self.model = model

    @property
    def available(self) -> bool:
        return self.model is not None

    def __call__(
        self,
        frames: np.ndarray,
        audio: np.ndarray,
        *,
        sample_rate: int = SAMPLE_RATE,
        fps: float = FPS,
    ) -> dict[str, Any]:
        """frames: (T, H, W, 3) RGB uint8 face crops; audio: (N,) float in [-1, 1] or int16.

        Returns {"status": "ok", "lse_d", "lse_c", "offset", "num_windows", "mean_dists"}
        or `unavailable(reason)`.
        """
        if self.model is None:
            return unavailable(self.reason or "no SyncNet model")
        if sample_rate != SAMPLE_RATE or fps != FPS:
            raise ValueError(
                f"SyncNet scores 25 fps video with 16 kHz audio; got {fps} fps, {sample_rate} Hz"
            )
        video, aud = syncnet_embeddings(self.model, frames, audio, self.batch_size)
        dists = np.asarray(sync_distances(video, aud, vshift=self.vshift))
        return scores_from_distances(dists, self.vshift) | {"expert": self.name}


@functools.cache
def _default_scorer() -> SyncScorer:
    return SyncScorer()


def lse_scores(
    frames: np.ndarray,
    audio: np.ndarray,
    *,
    model: SyncNet | None = None,
    sample_rate: int = SAMPLE_RATE,
    fps: float = FPS,
) -> dict[str, Any]:
    """LSE-D / LSE-C of one clip: see `SyncScorer.__call__`. model None: the pretrained
    network (loaded once per process), or an "unavailable" result without its file."""
    scorer = SyncScorer(model) if model is not None else _default_scorer()
    if not scorer.available:
        _default_scorer.cache_clear()  # the file may appear later in this process
    return scorer(frames, audio, sample_rate=sample_rate, fps=fps)


# ---------------------------------------------------------------------------------------
# LSE from our trained expert (training/sync_expert_train.py), when syncnet_v2 is missing
# ---------------------------------------------------------------------------------------
#
# The same procedure as above with the expert in SyncNet's place: window i = frames
# i..i+4 (lip embedding v_i) against the audio window of frame i+2 (a_i, the centre frame's
# (W, D) feature window, the DiT's own audio input); d[i, k] = 1 - cos(v_i, a_{i+k-vshift})
# (unit embeddings, so this is ||v - a||^2 / 2; in [0, 2]); m[k] = mean over the windows
# whose shifted audio exists (no zero padding: a zero vector has no cosine). LSE-D, LSE-C
# and the offset follow from m as in `scores_from_distances`. The numbers are on the
# expert's own scale: comparable between methods scored by the same expert checkpoint,
# never with SyncNet's (whose distances are Euclidean on 1024-d unnormalised embeddings).


def expert_mean_distances(lips: np.ndarray, audio: np.ndarray, vshift: int = VSHIFT) -> np.ndarray:
    """m[k], k in [0, 2 vshift]: mean over valid i of 1 - cos(lips_i, audio_{i + k - vshift})
    (NaN for an offset with no valid pair). lips, audio: (W, E) unit embeddings."""
    lips, audio = np.asarray(lips, np.float64), np.asarray(audio, np.float64)
    w = len(lips)
    means = np.full(2 * vshift + 1, np.nan)
    for k in range(2 * vshift + 1):
        shift = k - vshift
        i = np.arange(max(0, -shift), min(w, w - shift))
        if i.size:
            means[k] = np.mean(1.0 - np.sum(lips[i] * audio[i + shift], axis=-1))
    return means


def scores_from_mean_distances(mean: np.ndarray, num_windows: int, vshift: int) -> dict[str, Any]:
    """LSE-D, LSE-C, offset from m[k], k in [0, 2 vshift] (offsets without pairs, NaN,
    left out): min_k m[k], median - min (torch.median: the lower middle), vshift - argmin."""
    valid = np.flatnonzero(np.isfinite(mean))
    best = int(valid[np.argmin(mean[valid])])
    ordered = np.sort(mean[valid])
    median = float(ordered[(len(ordered) - 1) // 2])  # torch.median: lower middle
    return {
        "status": "ok",
        "lse_d": float(mean[best]),
        "lse_c": median - float(mean[best]),
        "offset": vshift - best,
        "num_windows": num_windows,
        "mean_dists": [float(m) for m in mean],
    }


class TrainedSyncScorer:
    """LSE-D / LSE-C from a trained sync expert: `SyncScorer`'s call signature, plus
    `name` ("trained expert <workdir>") for the report.

    workdir: a `configs/sync_expert.py` run; audio_features: how the per-frame features
    are computed from a waveform ("logmel" or "wav2vec2:PATH", as the dataset the expert
    was trained on was preprocessed: its metadata's provenance).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        audio_features: str = "logmel",
        vshift: int = VSHIFT,
        batch_size: int = 64,
    ):
        from dithead_jax.data.preprocess import AudioFeaturizer
        from dithead_jax.runs import load_sync_expert

        # Its plain weights alone (runs.py: no optimizer is built, no trainer imported).
        self.model, self.run = load_sync_expert(workdir)
        self.name = f"trained expert {workdir}"
        self.vshift, self.batch_size = vshift, batch_size
        self.featurize = AudioFeaturizer(audio_features, self.run.data)
        self.reason: str | None = None
        self._embed = jax.jit(_expert_embed, static_argnums=0)
        self._graphdef, self._state = nnx.split(self.model)

    available = True

    def embeddings(self, frames: np.ndarray, windows: np.ndarray) -> tuple[np.ndarray, ...]:
        """frames (T, H, W, 3) RGB uint8, windows (T, W, D) per-frame audio windows ->
        lip and audio embeddings (T - 4, E) each (window i: frames i..i+4, audio of i+2)."""
        from dithead_jax.models.sync_expert import CENTRE, LIP_FRAMES

        count = len(frames) - LIP_FRAMES + 1
        if count <= 0 or len(windows) < len(frames):
            raise ValueError(
                f"too short for the sync expert: {len(frames)} frames, {len(windows)} audio "
                f"windows (needs at least {LIP_FRAMES} of each)"
            )
        size = self.run.model.image_size
        x = np.asarray(frames, np.float32) / 127.5 - 1.0
        if x.shape[1:3] != (size, size):
            x = np.asarray(jax.image.resize(x, (len(x), size, size, 3), "bilinear"))
        index = np.arange(count)[:, None] + np.arange(LIP_FRAMES)[None, :]
        lips, auds = [], []
        for start in range(0, count, self.batch_size):
            rows = np.minimum(start + np.arange(self.batch_size), count - 1)  # fixed shape
            lip, aud = self._embed(
                self._graphdef, self._state, x[index[rows]], windows[rows + CENTRE]
            )
            n = min(self.batch_size, count - start)
            lips.append(np.asarray(lip[:n]))
            auds.append(np.asarray(aud[:n]))
        return np.concatenate(lips), np.concatenate(auds)

    def __call__(
        self,
        frames: np.ndarray,
        audio: np.ndarray,
        *,
        sample_rate: int = SAMPLE_RATE,
        fps: float = FPS,
    ) -> dict[str, Any]:
        """frames: (T, H, W, 3) RGB uint8 face crops; audio: (N,) float in [-1, 1]. Returns
        `scores_from_mean_distances`'s dict plus "expert": `self.name`."""
        from dithead_jax.data.audio_features import audio_windows

        data = self.run.data
        if sample_rate != data.sample_rate or fps != data.fps:
            raise ValueError(
                f"the sync expert scores {data.fps} fps video with {data.sample_rate} Hz "
                f"audio; got {fps} fps, {sample_rate} Hz"
            )
        audio = np.asarray(audio, np.float32).reshape(-1)
        per_frame = self.featurize(audio, len(frames))
        windows = audio_windows(per_frame, data.audio_window)
        lips, auds = self.embeddings(frames, windows)
        mean = expert_mean_distances(lips, auds, self.vshift)
        return scores_from_mean_distances(mean, len(lips), self.vshift) | {"expert": self.name}


def _expert_embed(
    graphdef: nnx.GraphDef, state: nnx.State, lips: Array, audio: Array
) -> tuple[Array, Array]:
    model = nnx.merge(graphdef, state)
    return model.embed_lips(lips), model.embed_audio(audio)


def find_expert(run_dir: str | os.PathLike | None) -> Path | None:
    """A trained expert next to a run: `<run_dir>/../sync_expert` holding checkpoints."""
    from dithead_jax.runs import neighbour_run

    return neighbour_run(run_dir, "sync_expert")


def make_sync_scorer(
    expert_workdir: str | os.PathLike | None, dataset: str | os.PathLike | None = None
) -> SyncScorer | TrainedSyncScorer:
    """The official SyncNet v2 when its weights are found; otherwise the trained expert in
    `expert_workdir` (its audio features as `dataset`'s preprocessing recorded them); else
    the unavailable `SyncScorer` naming what is missing."""
    official = SyncScorer()
    if official.available or expert_workdir is None:
        return official
    spec = "logmel"
    if dataset is not None:
        from dithead_jax.data.records import dataset_metadata

        with contextlib.suppress(FileNotFoundError):
            spec = dataset_metadata(dataset).get("provenance", {}).get("audio_features", spec)
    return TrainedSyncScorer(expert_workdir, audio_features=spec)
