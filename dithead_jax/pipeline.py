"""Dubbing as a library call, diffusers-style:

    from dithead_jax import DiTHeadPipeline
    pipe = DiTHeadPipeline.from_pretrained("runs/dit")          # or an exported folder
    out = pipe(video="face.mp4", audio="speech.wav", steps=50)   # also arrays in
    out.save("dubbed.mp4")                                       # out.frames: (T, H, W, 3)

The video is cropped as the training set was (the run's stage-1 margin; landmarks from a
`<video>.npz` sidecar, dlib, face_alignment or an array), the speech turned into the run's
audio features, the video looped back and forth (ping-pong) or trimmed to the speech, the
lower faces generated, and each pasted back through its crop box with the soft lower-face
mask, so outside the mask the output is the source video. The video's own sound is never
read. Bad input raises ValueError / FileNotFoundError with a one-line message naming it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("x0_same_step", "noisy_same_step", "fixed", "final")
LANDMARKS = ("sidecar_or_dlib", "sidecar", "dlib", "face_alignment")


@dataclasses.dataclass
class DubbedVideo:
    """A pipeline's output: composited frames with their speech."""

    frames: np.ndarray  # (T, H, W, 3) uint8 (source | dubbed side by side if asked)
    audio: np.ndarray  # (N,) float32, peak-normalised, exactly the frames' duration
    sample_rate: int
    fps: int
    faces: np.ndarray  # (T, S, S, 3) uint8: the generated face crops before paste-back

    def save(self, path: str | os.PathLike) -> Path:
        """Writes an H.264 mp4 with the speech muxed in; returns its path."""
        from dithead_jax.data.video_io import write_video

        frames = self.frames
        if frames.shape[1] % 2 or frames.shape[2] % 2:  # H.264 4:2:0 needs even sizes
            frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
        write_video(path, frames, self.fps, self.audio, self.sample_rate)
        return Path(path)


class DiTHeadPipeline:
    """A loaded DiT-Head system (sampling.Models) that dubs videos; compiled pieces are
    kept between calls, so a second video of the same length does not recompile."""

    def __init__(self, models: Any):
        self.models = models
        self._featurizers: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> DiTHeadPipeline:
        """From a train.py DiT workdir (EMA weights; no optimizer state is read) or a folder
        written by `python -m dithead_jax.export`."""
        from dithead_jax.sampling import load_models

        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such model folder (a DiT workdir or an export)")
        return cls(load_models(path))

    @property
    def data(self):
        """The DataConfig data/preprocess.py cropped and masked the training set with: its
        defaults at the run's crop size and audio-feature width."""
        from dithead_jax.config import DataConfig

        models = self.models
        return DataConfig(image_size=int(models.image_size),
                          audio_dim=models.dit_run.model.audio_dim)  # fmt: skip

    def featurizer(self):
        from dithead_jax.data.preprocess import AudioFeaturizer

        spec = self.models.audio_features
        if spec not in self._featurizers:  # a Wav2Vec2 model is built once per pipeline
            self._featurizers[spec] = AudioFeaturizer(spec, self.data)
        return self._featurizers[spec]

    def __call__(
        self,
        video: str | os.PathLike | np.ndarray,
        audio: str | os.PathLike | np.ndarray,
        *,
        steps: int = 50,
        reference: str = "x0_same_step",
        seed: int = 0,
        guidance: float = 1.0,
        landmarks: str | np.ndarray = "sidecar_or_dlib",
        side_by_side: bool = False,
    ) -> DubbedVideo:
        """Dubs `video` (a file, or uint8 frames (T, H, W, 3) at the run's 25 fps) with
        `audio` (a file, or float samples at 16 kHz). `landmarks`: where each frame's 68
        points come from, or a (T, 68, 2) array of them in source pixels (needed for
        array input unless dlib/face_alignment are to find them)."""
        from dithead_jax.data import audio_features as af
        from dithead_jax.generation import frames_for_audio, paste_back, pingpong_indices
        from dithead_jax.sampling import check_guidance, generate_faces

        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps})")
        if reference not in MODES:
            raise ValueError(f"unknown reference mode {reference!r}; choose from {list(MODES)}")
        check_guidance(self.models.dit_run, guidance)
        data = self.data
        inputs = prepare(video, audio, landmarks, self.models.stage1, data)
        crops, speech, rate, sources = (inputs[k] for k in ("crops", "speech", "rate", "sources"))
        count = frames_for_audio(len(crops["frame"]), len(speech), rate, data.fps)
        index = pingpong_indices(len(crops["frame"]), count)
        speech = af.peak_normalize(speech[: count * rate // data.fps])
        windows = af.audio_windows(self.featurizer()(speech, count), data.audio_window)
        rng = np.random.default_rng(seed)
        first = crops["frame"][rng.integers(len(crops["frame"]))]
        faces = generate_faces(
            self.models, crops["masked_frame"][index], windows, first,
            steps=steps, mode=reference, seed=seed, guidance=guidance,
            landmarks=crops["landmarks"][index],
        )  # fmt: skip
        out = []
        for k, i in enumerate(index):
            source = sources[crops["frame_index"][i]]
            alpha = crops["mask"][i].astype(np.float32) / 255
            frame = paste_back(source, faces[k], crops["crop_box"][i], alpha)
            out.append(np.concatenate([source, frame], 1) if side_by_side else frame)
        return DubbedVideo(np.stack(out), speech, rate, data.fps, faces)


# ---------------------------------------------------------------------------------------
# Inputs: frames, landmarks, crops and speech


def _name(value: Any, what: str) -> str:
    return os.fspath(value) if isinstance(value, str | os.PathLike) else f"the {what} array"


def read_frames(video: str | os.PathLike | np.ndarray, fps: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video file at `fps`, or the array checked."""
    from dithead_jax.data.video_io import MediaError, iter_frames_at_fps

    if isinstance(video, str | os.PathLike):
        if not Path(video).is_file():
            raise FileNotFoundError(f"{video}: not found")
        try:
            frames = list(iter_frames_at_fps(video, fps))
        except MediaError as e:
            raise ValueError(str(e) if os.fspath(video) in str(e) else f"{video}: {e}") from None
        if not frames:
            raise ValueError(f"{video}: no video frames")
        return np.stack(frames)
    frames = np.asarray(video)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"video array must be uint8 (T, H, W, 3) with T >= 1, got "
                         f"{frames.dtype} {frames.shape}")  # fmt: skip
    return frames


def read_speech(audio: str | os.PathLike | np.ndarray, sample_rate: int) -> np.ndarray:
    """(N,) float32 speech at `sample_rate` from an audio (or video) file, or the array."""
    from dithead_jax.data.video_io import MediaError, read_audio

    if isinstance(audio, str | os.PathLike):
        if not Path(audio).is_file():
            raise FileNotFoundError(f"{audio}: not found")
        try:
            speech, _ = read_audio(audio, sample_rate)
        except MediaError as e:
            raise ValueError(str(e)) from None  # names the audio file alone
    else:
        speech = np.asarray(audio, np.float32)
        if speech.ndim != 1:
            raise ValueError(f"audio array must be mono (N,) at {sample_rate} Hz, got "
                             f"shape {speech.shape}")  # fmt: skip
        if not np.all(np.isfinite(speech)):
            raise ValueError("the audio array holds non-finite samples")
    if len(speech) == 0:
        raise ValueError(f"{_name(audio, 'audio')}: the audio stream holds no samples")
    return speech.astype(np.float32)


def find_landmarks(
    video: str | os.PathLike | np.ndarray, frames: np.ndarray, landmarks: str | np.ndarray
) -> np.ndarray:
    """(T, 68, 2) float32 source-pixel landmarks per frame (NaN rows: no face found)."""
    from dithead_jax.data.faces import make_landmarker, sidecar_landmarks

    name = _name(video, "video")
    if not isinstance(landmarks, str):
        points = np.asarray(landmarks, np.float32)
        if points.shape != (len(frames), 68, 2):
            raise ValueError(f"landmarks array must be ({len(frames)}, 68, 2) for {name}, got "
                             f"{points.shape}")  # fmt: skip
        return points
    if landmarks not in LANDMARKS:
        raise ValueError(f"unknown landmarks {landmarks!r}; choose from {list(LANDMARKS)}")
    is_file = isinstance(video, str | os.PathLike)
    if landmarks == "sidecar_or_dlib":
        sidecar = is_file and Path(video).with_suffix(".npz").is_file()
        landmarks = "sidecar" if sidecar else "dlib"
    if landmarks == "sidecar":
        if not is_file:
            raise ValueError("landmarks='sidecar' reads <video>.npz: pass a video file, or "
                             "the landmarks as a (T, 68, 2) array")  # fmt: skip
        return sidecar_landmarks(video, len(frames))
    detect = make_landmarker(landmarks)
    found = [detect(frame) for frame in frames]
    missing = np.full((68, 2), np.nan, np.float32)
    return np.stack([missing if p is None else np.asarray(p, np.float32) for p in found])


def crop_faces(
    frames: np.ndarray, landmarks: np.ndarray, margin: float, data: Any, name: str
) -> dict[str, np.ndarray]:
    """Per-frame face crops as data/preprocess.py makes them (every frame must have a
    face: a dub has no frame to skip): frame, masked_frame, mask, landmarks (crop pixels),
    crop_box, frame_index."""
    from dithead_jax.data.faces import face_boxes
    from dithead_jax.data.preprocess import face_crop

    valid = np.all(np.isfinite(landmarks), axis=(1, 2))
    if not valid.all():
        raise ValueError(f"{name}: no face in {int((~valid).sum())} of {len(frames)} frames")
    boxes = face_boxes(landmarks, margin)
    crops = [
        face_crop(frame, points, box, data.image_size, data)
        for frame, points, box in zip(frames, landmarks, boxes, strict=True)
    ]
    out = {k: np.stack([crop[k] for crop in crops]) for k in crops[0]}
    out["crop_box"] = boxes
    out["frame_index"] = np.arange(len(frames), dtype=np.int32)
    return out


def prepare(
    video: str | os.PathLike | np.ndarray,
    audio: str | os.PathLike | np.ndarray,
    landmarks: str | np.ndarray,
    stage1: dict[str, Any],
    data: Any,
) -> dict[str, Any]:
    """The source frames, their face crops (cropped as the training set was: `stage1` is
    its provenance) and the speech: sources, crops, speech (N,) float32, rate."""
    from dithead_jax.data.faces import NoFaceError
    from dithead_jax.data.preprocess import PreprocessConfig

    # Crop exactly as the training set was cropped (datasets made before --margin: 0.35).
    margin = float(stage1.get("margin", PreprocessConfig.margin))
    sources = read_frames(video, data.fps)
    points = find_landmarks(video, sources, landmarks)
    try:
        crops = crop_faces(sources, points, margin, data, _name(video, "video"))
    except NoFaceError as e:
        raise ValueError(f"{_name(video, 'video')}: {e}") from None
    speech = read_speech(audio, data.sample_rate)
    return dict(sources=sources, crops=crops, speech=speech, rate=data.sample_rate)
