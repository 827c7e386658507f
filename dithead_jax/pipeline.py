"""Dubbing as a library call, diffusers-style:

    from dithead_jax import DiTHeadPipeline
    pipe = DiTHeadPipeline.from_pretrained("runs/dit")          # or an exported folder
    out = pipe(video="face.mp4", audio="speech.wav", steps=50)   # also arrays in
    out.save("dubbed.mp4")                                       # out.frames: (T, H, W, 3)
    pipe.dub("face.mp4", "speech.wav", "dubbed.mp4")             # any length, streamed

The video is cropped as the training set was (the run's stage-1 margin; landmarks from a
`<video>.npz` sidecar, dlib, face_alignment or an array), the speech turned into the run's
audio features, the video looped back and forth (ping-pong) or trimmed to the speech, the
lower faces generated, and each pasted back through its crop box with the soft lower-face
mask, so outside the mask the output is the source video. The video's own sound is never
read. Bad input raises ValueError / FileNotFoundError with a one-line message naming it.

Memory. Two passes over the video: the first decodes it once, spooling the frames to an
unnamed temporary file (`FrameSpool`; the OS file cache, not process memory, holds them)
while finding landmarks; the crop boxes are then smoothed over the whole video (which is
why the crops cannot be cut during that pass). The second goes chunk by chunk through
the output frames (ping-pong order: any source frame read back by index), cropping,
generating, pasting back and handing the chunk on. `dub` encodes each chunk as it comes,
so its memory is a few chunks whatever the video's length; `__call__` keeps every frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dithead_jax.interpolation import MODES as INTERPOLATE_MODES

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
        from dithead_jax.generation import even_frames

        write_video(path, even_frames(self.frames), self.fps, self.audio, self.sample_rate)
        return Path(path)


@dataclasses.dataclass
class Dub:
    """What the first pass found, and the chunks of the second (`DiTHeadPipeline.dubbing`)."""

    chunks: Iterator[tuple[np.ndarray, np.ndarray]]  # (composited frames, faces) per chunk
    frames: int  # output frames in all
    speech: np.ndarray  # (N,) float32, peak-normalised, exactly the frames' duration
    sample_rate: int
    fps: int


class DiTHeadPipeline:
    """A loaded DiT-Head system (sampling.Models) that dubs videos; compiled pieces are
    kept between calls and depend on the chunk size, not on a video's length, so a second
    video does not recompile."""

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
        steps: int | None = None,
        reference: str | None = None,
        seed: int = 0,
        guidance: float | None = None,
        landmarks: str | np.ndarray = "sidecar_or_dlib",
        side_by_side: bool = False,
        options: Any = None,
        chunk_frames: int | None = None,
    ) -> DubbedVideo:
        """Dubs `video` (a file, or uint8 frames (T, H, W, 3) at the run's 25 fps) with
        `audio` (a file, or float samples at 16 kHz), every frame held in memory (short
        clips; `dub` streams any length to a file). `landmarks`: where each frame's 68
        points come from, or a (T, 68, 2) array of them in source pixels (needed for
        array input unless dlib/face_alignment are to find them). `options`: a
        sampling.InferenceOptions (default: its defaults); `steps`, `reference` (its
        mode), `guidance` and `chunk_frames` override its fields. Chunking does not
        change the frames (sampling.FaceStream continues the clip chunk to chunk)."""
        frames, faces = [], []
        with self.dubbing(
            video, audio, steps=steps, reference=reference, seed=seed, guidance=guidance,
            landmarks=landmarks, side_by_side=side_by_side, options=options,
            chunk_frames=chunk_frames,
        ) as dub:  # fmt: skip
            for chunk, chunk_faces in dub.chunks:
                frames.append(chunk)
                faces.append(chunk_faces)
        return DubbedVideo(np.concatenate(frames), dub.speech, dub.sample_rate, dub.fps,
                           np.concatenate(faces))  # fmt: skip

    def dub(
        self,
        video: str | os.PathLike | np.ndarray,
        audio: str | os.PathLike | np.ndarray,
        out: str | os.PathLike,
        *,
        progress: bool = False,
        **kwargs: Any,
    ) -> int:
        """Dubs as `__call__` (same keyword arguments) straight into the mp4 `out`, one
        chunk of frames at a time (`chunk_frames`, default InferenceOptions.chunk_frames),
        so memory stays bounded however long the video (odd frame sizes lose their last
        row/column: H.264 4:2:0). `progress`: tqdm bars on stderr. Returns the number of
        frames written; on error no file is left."""
        from tqdm import tqdm

        from dithead_jax.data.video_io import VideoWriter
        from dithead_jax.generation import even_frames

        with self.dubbing(video, audio, progress=progress, **kwargs) as dub:
            bar = tqdm(total=dub.frames, unit="frame", desc="dubbing", file=sys.stderr,
                       disable=not progress, dynamic_ncols=True)  # fmt: skip
            with bar, VideoWriter(out, dub.fps, dub.speech, dub.sample_rate) as writer:
                for chunk, _ in dub.chunks:
                    writer.write(even_frames(chunk))
                    bar.update(len(chunk))
        return dub.frames

    @contextlib.contextmanager
    def dubbing(
        self,
        video: str | os.PathLike | np.ndarray,
        audio: str | os.PathLike | np.ndarray,
        *,
        steps: int | None = None,
        reference: str | None = None,
        seed: int = 0,
        guidance: float | None = None,
        landmarks: str | np.ndarray = "sidecar_or_dlib",
        side_by_side: bool = False,
        options: Any = None,
        chunk_frames: int | None = None,
        progress: bool = False,
        spool_dir: str | os.PathLike | None = None,
    ) -> Iterator[Dub]:
        """Runs the first pass (speech, decode, landmarks, boxes) and yields a `Dub` whose
        chunks run the second lazily; the spooled frames are deleted on exit. `spool_dir`:
        where a video file's decoded frames wait (default: the system's temporary folder;
        2.8 MB a 720p frame)."""
        from dithead_jax.data import audio_features as af
        from dithead_jax.generation import frames_for_audio, pingpong_indices
        from dithead_jax.interpolation import FrameDoubler
        from dithead_jax.sampling import FaceStream, interpolator

        options = self._options(options, steps=steps, mode=reference, guidance=guidance,
                                chunk_frames=chunk_frames)  # fmt: skip
        data = self.data
        speech = read_speech(audio, data.sample_rate)  # first: it fails in a moment
        source = read_source(video, landmarks, self.models.stage1, data,
                             spool_dir=spool_dir, progress=progress)  # fmt: skip
        with contextlib.closing(source):
            rate = data.sample_rate
            count = frames_for_audio(len(source.boxes), len(speech), rate, data.fps)
            speech = af.peak_normalize(speech[: count * rate // data.fps])
            windows = af.audio_windows(self.featurizer()(speech, count), data.audio_window)
            first = np.random.default_rng(seed).integers(len(source.boxes))
            reference_crop = source.crop(first, data)["frame"]
            faces = FaceStream(self.models, reference_crop, options=options, seed=seed)
            doubler, fps = None, data.fps
            if options.interpolate == "double":  # the paper's 2x frame rate
                doubler = FrameDoubler(interpolator(self.models, options.interpolator))
                count, fps = 2 * count - 1, 2 * data.fps
            chunks = _chunks(source, pingpong_indices(len(source.boxes), len(windows)),
                             windows, faces, data, options.chunk_frames, side_by_side,
                             doubler)  # fmt: skip
            yield Dub(chunks, count, speech, rate, fps)

    def _options(self, options: Any, **overrides: Any) -> Any:
        """InferenceOptions with the overrides that were given, checked."""
        from dithead_jax.sampling import InferenceOptions, check_guidance

        options = dataclasses.replace(
            options or InferenceOptions(), **{k: v for k, v in overrides.items() if v is not None}
        )
        if options.steps < 1:
            raise ValueError(f"steps must be >= 1 (got {options.steps})")
        if options.mode not in MODES:
            raise ValueError(f"unknown reference mode {options.mode!r}; choose from "
                             f"{list(MODES)}")  # fmt: skip
        if options.interpolate not in INTERPOLATE_MODES:
            raise ValueError(f"unknown interpolate mode {options.interpolate!r}; choose from "
                             f"{list(INTERPOLATE_MODES)}")  # fmt: skip
        if options.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1 (got {options.chunk_frames})")
        check_guidance(self.models.dit_run, options.guidance)
        return options


# ---------------------------------------------------------------------------------------
# Generation, chunk by chunk


def _chunks(
    source: Source,
    index: np.ndarray,
    windows: np.ndarray,
    faces: Any,
    data: Any,
    chunk_frames: int,
    side_by_side: bool,
    doubler: Any = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(composited frames, generated faces) for output frames [start, start + chunk), in
    order. Interpolation (`faces` a sampling.FaceStream) may hold frames back: they are
    pasted when final, the last ones after the loop; `doubler` (interpolation.
    FrameDoubler, interpolate="double") then doubles the composited frames."""
    from dithead_jax.generation import paste_chunk

    waiting: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (source, box, mask)

    def composited(generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ready, waiting[:] = waiting[: len(generated)], waiting[len(generated) :]
        sources, boxes, masks = (list(x) for x in zip(*ready, strict=True)) if ready else ([],) * 3
        out = paste_chunk(sources, generated, np.asarray(boxes), np.asarray(masks), side_by_side)
        return (doubler.push(out) if doubler is not None else out), generated

    for start in range(0, len(index), chunk_frames):
        frames = index[start : start + chunk_frames]
        sources = [source.frames[i] for i in frames]
        crops = [source.crop(i, data, frame) for i, frame in zip(frames, sources, strict=True)]
        crops = {k: np.stack([c[k] for c in crops]) for k in ("masked_frame", "mask", "landmarks")}
        waiting += zip(sources, source.boxes[frames], crops["mask"], strict=True)
        generated = faces(crops["masked_frame"], windows[start : start + len(frames)],
                          landmarks=crops["landmarks"], masks=crops["mask"])  # fmt: skip
        if len(generated):
            yield composited(generated)
    held_back = faces.flush()
    if len(held_back):
        yield composited(held_back)


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
    from dithead_jax.data.faces import make_landmarker

    how = _landmark_source(video, landmarks)
    found = None
    if isinstance(how, str) and how != "sidecar":
        detect = make_landmarker(how)
        found = [detect(frame) for frame in frames]
    return _collect_landmarks(video, how, len(frames), found)


def _landmark_source(
    video: str | os.PathLike | np.ndarray, landmarks: str | np.ndarray
) -> str | np.ndarray:
    """`landmarks` checked and resolved: an array, "sidecar", "dlib" or "face_alignment"."""
    if not isinstance(landmarks, str):
        return np.asarray(landmarks, np.float32)
    if landmarks not in LANDMARKS:
        raise ValueError(f"unknown landmarks {landmarks!r}; choose from {list(LANDMARKS)}")
    is_file = isinstance(video, str | os.PathLike)
    if landmarks == "sidecar_or_dlib":
        sidecar = is_file and Path(video).with_suffix(".npz").is_file()
        landmarks = "sidecar" if sidecar else "dlib"
    if landmarks == "sidecar" and not is_file:
        raise ValueError("landmarks='sidecar' reads <video>.npz: pass a video file, or "
                         "the landmarks as a (T, 68, 2) array")  # fmt: skip
    return landmarks


def _collect_landmarks(
    video: str | os.PathLike | np.ndarray, how: str | np.ndarray, count: int, found: list | None
) -> np.ndarray:
    """The (count, 68, 2) landmarks `how` gives, once the frames are counted: the array
    checked, the sidecar read, or a detector's per-frame `found` (None: no face)."""
    from dithead_jax.data.faces import sidecar_landmarks

    if not isinstance(how, str):
        if how.shape != (count, 68, 2):
            raise ValueError(f"landmarks array must be ({count}, 68, 2) for "
                             f"{_name(video, 'video')}, got {how.shape}")  # fmt: skip
        return how
    if how == "sidecar":
        return sidecar_landmarks(video, count)
    missing = np.full((68, 2), np.nan, np.float32)
    return np.stack([missing if p is None else np.asarray(p, np.float32) for p in found])


def face_boxes_for(landmarks: np.ndarray, margin: float, name: str) -> np.ndarray:
    """(T, 4) crop boxes as data/preprocess.py makes them, smoothed over the whole video;
    every frame must have a face (a dub has no frame to skip)."""
    from dithead_jax.data.faces import NoFaceError, face_boxes

    valid = np.all(np.isfinite(landmarks), axis=(1, 2))
    if not valid.all():
        raise ValueError(f"{name}: no face in {int((~valid).sum())} of {len(landmarks)} frames")
    try:
        return face_boxes(landmarks, margin)
    except NoFaceError as e:
        raise ValueError(f"{name}: {e}") from None


def crop_faces(
    frames: np.ndarray, landmarks: np.ndarray, margin: float, data: Any, name: str
) -> dict[str, np.ndarray]:
    """Per-frame face crops as data/preprocess.py makes them: frame, masked_frame, mask,
    landmarks (crop pixels), crop_box, frame_index."""
    from dithead_jax.data.preprocess import face_crop

    boxes = face_boxes_for(landmarks, margin, name)
    crops = [
        face_crop(frame, points, box, data.image_size, data)
        for frame, points, box in zip(frames, landmarks, boxes, strict=True)
    ]
    out = {k: np.stack([crop[k] for crop in crops]) for k in crops[0]}
    out["crop_box"] = boxes
    out["frame_index"] = np.arange(len(frames), dtype=np.int32)
    return out


@dataclasses.dataclass
class Source:
    """The video to dub after the first pass: its frames (an array, or a FrameSpool read
    back one frame at a time), each frame's landmarks and smoothed crop box."""

    frames: Any  # frames[i] -> (H, W, 3) uint8
    landmarks: np.ndarray  # (T, 68, 2) source pixels
    boxes: np.ndarray  # (T, 4)

    def crop(self, i: int, data: Any, frame: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Frame i's face crop record (preprocess.face_crop); `frame`: frame i if at hand."""
        from dithead_jax.data.preprocess import face_crop

        frame = self.frames[i] if frame is None else frame
        return face_crop(frame, self.landmarks[i], self.boxes[i], data.image_size, data)

    def close(self) -> None:
        if hasattr(self.frames, "close"):
            self.frames.close()


def read_source(
    video: str | os.PathLike | np.ndarray,
    landmarks: str | np.ndarray,
    stage1: dict[str, Any],
    data: Any,
    *,
    spool_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Source:
    """The first pass: a file is decoded once (at data.fps) into a FrameSpool in
    `spool_dir` (default: the system's temporary folder; 2.8 MB a 720p frame) while any
    detector runs on each frame, so no more than one decoded frame is held; an array is
    used as it is. Close the Source to delete the spool."""
    from dithead_jax.data.faces import make_landmarker
    from dithead_jax.data.preprocess import PreprocessConfig
    from dithead_jax.data.video_io import FrameSpool

    # Crop exactly as the training set was cropped (datasets made before --margin: 0.35).
    margin = float(stage1.get("margin", PreprocessConfig.margin))
    name = _name(video, "video")
    if not isinstance(video, str | os.PathLike):
        frames = read_frames(video, data.fps)
        points = find_landmarks(video, frames, landmarks)
        return Source(frames, points, face_boxes_for(points, margin, name))
    if not Path(video).is_file():
        raise FileNotFoundError(f"{video}: not found")
    how = _landmark_source(video, landmarks)
    detect = make_landmarker(how) if isinstance(how, str) and how != "sidecar" else None
    spool = FrameSpool(spool_dir)
    try:
        found = _spool_frames(video, data.fps, spool, detect, progress)
        points = _collect_landmarks(video, how, len(spool), found)
        return Source(spool, points, face_boxes_for(points, margin, name))
    except BaseException:
        spool.close()
        raise


def _spool_frames(
    video: str | os.PathLike, fps: int, spool: Any, detect: Callable | None, progress: bool
) -> list | None:
    """Decodes `video` into `spool`; the detector's per-frame results if there is one."""
    from tqdm import tqdm

    from dithead_jax.data.video_io import MediaError, iter_frames_at_fps

    found = [] if detect else None
    try:
        frames = iter_frames_at_fps(video, fps)
        for frame in tqdm(frames, desc="reading", unit="frame", file=sys.stderr,
                          disable=not progress, dynamic_ncols=True):  # fmt: skip
            spool.append(frame)
            if detect:
                found.append(detect(frame))
    except MediaError as e:
        raise ValueError(str(e) if os.fspath(video) in str(e) else f"{video}: {e}") from None
    if not len(spool):
        raise ValueError(f"{video}: no video frames")
    return found


def prepare(
    video: str | os.PathLike | np.ndarray,
    audio: str | os.PathLike | np.ndarray,
    landmarks: str | np.ndarray,
    stage1: dict[str, Any],
    data: Any,
) -> dict[str, Any]:
    """Every source frame, its face crop (cropped as the training set was: `stage1` is
    its provenance) and the speech, in memory: sources, crops, speech (N,) float32, rate.
    (`DiTHeadPipeline` streams instead: `read_source`.)"""
    from dithead_jax.data.preprocess import PreprocessConfig

    margin = float(stage1.get("margin", PreprocessConfig.margin))
    sources = read_frames(video, data.fps)
    points = find_landmarks(video, sources, landmarks)
    crops = crop_faces(sources, points, margin, data, _name(video, "video"))
    speech = read_speech(audio, data.sample_rate)
    return dict(sources=sources, crops=crops, speech=speech, rate=data.sample_rate)
