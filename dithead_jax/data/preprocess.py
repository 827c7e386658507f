"""Video -> per-frame training records: face crops, landmarks, masks, audio windows.

One code path for HDTF and the synthetic set. Per video:
  1. probe; audio to mono 16 kHz, peak-normalised to [-1, 1];
  2. landmarks per frame at 25 fps (detector pass, or the sidecar file);
  3. smoothed square crop boxes; crop + resize to `size`; landmarks into crop pixels;
  4. the lower-face mask (masks.py) and the masked frame;
  5. audio features per video frame (logmel or Wav2Vec2 logits), 11-frame windows.
Frames without a face either split the video into face segments (`drop_frames`; segments
shorter than the audio window are dropped) or reject the video (`drop_video`).
Everything that can go wrong with an input raises `SkipVideo` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dithead_jax.config import DataConfig
from dithead_jax.data import audio_features as af
from dithead_jax.data.faces import (
    crop_face,
    face_boxes,
    landmarks_to_crop,
    make_landmarker,
    sidecar_landmarks,
)
from dithead_jax.data.masks import apply_mask, lower_face_mask
from dithead_jax.data.sources import remove_source, write_source
from dithead_jax.data.video_io import MediaError, iter_frames_at_fps, probe_video, read_audio

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")


class SkipVideo(Exception):
    """A video that yields no records; the message is the reason shown in the summary."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    landmarks: str = "face_alignment"  # face_alignment | dlib | sidecar
    audio_features: str = "logmel"  # logmel | wav2vec2:PATH_OR_HUB_ID
    size: int = 256
    margin: float = 0.35
    missing_face: str = "drop_frames"  # drop_frames | drop_video
    max_av_mismatch_seconds: float = 0.5
    data: DataConfig = DataConfig()

    @property
    def feature_dim(self) -> int:
        return self.data.audio_dim


def find_videos(root: str | Path) -> list[Path]:
    """Every video under `root` (recursively), sorted; hidden/temporary files excluded."""
    root = Path(root)
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in VIDEO_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def video_key(root: str | Path, path: Path) -> tuple[str, str]:
    """(identity, video_id): identity is the folder holding the video (`<identity>/<clip>`,
    the layout of data/synthetic.py and data/hdtf/prepare.py); video_id its path from root."""
    rel = path.relative_to(root).with_suffix("")
    identity = rel.parent.name or rel.name
    return identity, "/".join(rel.parts)


class AudioFeaturizer:
    """Audio -> (T, D) per-frame features; builds the Wav2Vec2 model once per process."""

    def __init__(self, spec: str, data: DataConfig):
        self.spec, self.data = spec, data
        self._wav2vec2 = None
        if spec != "logmel" and not spec.startswith("wav2vec2:"):
            raise ValueError(f"unknown audio features {spec!r} (logmel | wav2vec2:PATH_OR_HUB_ID)")

    def __call__(self, audio: np.ndarray, num_frames: int) -> np.ndarray:
        if self.spec == "logmel":
            return af.logmel_features(
                audio, self.data.sample_rate, num_frames, self.data.fps, self.data.audio_dim
            )
        if self._wav2vec2 is None:
            from dithead_jax.convert.hf_wav2vec2 import load_wav2vec2

            self._wav2vec2 = load_wav2vec2(self.spec.split(":", 1)[1])
        model, config, extractor = self._wav2vec2
        return af.wav2vec2_features(
            audio, self.data.sample_rate, num_frames, self.data.fps, model, config, extractor
        )


@dataclasses.dataclass
class Segment:
    """Consecutive frames [start, stop) of one video that all have a face."""

    start: int
    stop: int


def face_segments(valid: np.ndarray, min_frames: int) -> list[Segment]:
    """Runs of True in `valid` at least `min_frames` long."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], valid.astype(int), [0]])))
    runs = [Segment(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return [r for r in runs if r.stop - r.start >= min_frames]


def _landmarks_pass(path: Path, cfg: PreprocessConfig, landmarker: Callable | None) -> np.ndarray:
    if cfg.landmarks == "sidecar":
        count = sum(1 for _ in iter_frames_at_fps(path, cfg.data.fps))
        return sidecar_landmarks(path, count)
    found = []
    for frame in iter_frames_at_fps(path, cfg.data.fps):
        points = landmarker(frame)
        found.append(np.full((68, 2), np.nan, np.float32) if points is None else points)
    return np.stack(found) if found else np.zeros((0, 68, 2), np.float32)


def process_video(
    path: Path,
    cfg: PreprocessConfig,
    featurizer: AudioFeaturizer,
    landmarker: Callable | None = None,
    chunk_frames: int = 256,
    *,
    with_audio: bool = True,
    on_speech: Callable[[np.ndarray], None] | None = None,
) -> Iterator[tuple[Segment, dict[str, np.ndarray]]]:
    """Yields (segment, records) chunks of at most `chunk_frames` frames, in frame order.

    with_audio=False (dubbing: the speech comes from another file) neither needs nor reads
    the video's own sound; `audio` is then zeros and `featurizer` may be None.
    on_speech: called once, before the first chunk, with the video's sound under its frames
    ((frames x 640,) float32 at 16 kHz, before peak normalisation), for `data/sources.py`.

    records: frame/masked_frame (n, S, S, 3) uint8, mask (n, S, S) uint8, landmarks
    (n, 68, 2) f32 (crop pixels), crop_box (n, 4) f32, source_size (n, 2) i32, audio
    (n, W, D) f32, frame_index (n,) i32 (frame of the source video at 25 fps). Raises SkipVideo.
    """
    try:
        info = probe_video(path)
        if with_audio and not info.has_audio:
            raise SkipVideo("no audio stream")
        audio = read_audio(path, cfg.data.sample_rate)[0] if with_audio else None
        landmarks = _landmarks_pass(path, cfg, landmarker)
    except (MediaError, FileNotFoundError, ValueError) as e:
        raise SkipVideo(str(e).split(": ", 1)[-1] if str(path) in str(e) else str(e)) from e
    num_frames = len(landmarks)
    window = cfg.data.audio_window
    if num_frames < window:
        raise SkipVideo(f"only {num_frames} frames at {cfg.data.fps} fps (< {window})")
    if audio is not None:
        video_seconds = num_frames / cfg.data.fps
        audio_seconds = len(audio) / cfg.data.sample_rate
        if abs(audio_seconds - video_seconds) > cfg.max_av_mismatch_seconds:
            raise SkipVideo(
                f"audio {audio_seconds:.2f} s vs video {video_seconds:.2f} s "
                f"(limit {cfg.max_av_mismatch_seconds} s)"
            )
        samples = num_frames * cfg.data.sample_rate // cfg.data.fps
        audio = np.pad(audio, (0, max(0, samples - len(audio))))[:samples]
        speech = audio
        audio = af.peak_normalize(audio)

    valid = np.all(np.isfinite(landmarks), axis=(1, 2))
    if not valid.any():
        raise SkipVideo("no face in any frame")
    if cfg.missing_face == "drop_video" and not valid.all():
        raise SkipVideo(f"no face in {int((~valid).sum())} of {num_frames} frames")
    segments = face_segments(valid, window)
    if not segments:
        raise SkipVideo(f"no run of {window} consecutive frames with a face")

    # Audio features come from the whole clip so windows at segment edges hear real audio.
    if audio is None:
        windows = np.zeros((num_frames, window, cfg.data.audio_dim), np.float32)
    else:
        windows = af.audio_windows(featurizer(audio, num_frames), window)
        if on_speech is not None:
            on_speech(speech)
    boxes = face_boxes(landmarks, cfg.margin)
    yield from _crop_segments(
        path, cfg, segments, landmarks, boxes, windows, (info.height, info.width), chunk_frames
    )


def face_crop(
    frame: np.ndarray, landmarks: np.ndarray, box: np.ndarray, size: int, data: DataConfig
) -> dict[str, np.ndarray]:
    """One frame's face as stage 1 stores it (and dubbing crops it): the crop `box` of
    `frame` resized to `size`, its lower-face-masked copy, the soft mask as uint8 alpha and
    the landmarks moved from source to crop pixels."""
    crop_points = landmarks_to_crop(landmarks, box, size)
    crop = crop_face(frame, box, size)
    alpha = lower_face_mask(crop_points, size, data)
    return {
        "frame": crop,
        "masked_frame": apply_mask(crop, alpha, data.mask_fill),
        "mask": np.round(alpha * 255).astype(np.uint8),
        "landmarks": crop_points,
    }


def _crop_segments(
    path: Path,
    cfg: PreprocessConfig,
    segments: list[Segment],
    landmarks: np.ndarray,
    boxes: np.ndarray,
    windows: np.ndarray,
    source_size: tuple[int, int],
    chunk_frames: int,
) -> Iterator[tuple[Segment, dict[str, np.ndarray]]]:
    size = cfg.size
    owner = np.full(len(landmarks), -1)
    for k, seg in enumerate(segments):
        owner[seg.start : seg.stop] = k
    buffer: dict[str, list] = {}
    current = -1

    def flush() -> tuple[Segment, dict[str, np.ndarray]]:
        records = {k: np.stack(v) for k, v in buffer.items()}
        buffer.clear()
        return segments[current], records

    try:
        for t, frame in enumerate(iter_frames_at_fps(path, cfg.data.fps)):
            if t >= len(landmarks):
                break
            k = owner[t]
            if k != current and buffer:
                yield flush()
            current = k
            if k < 0:
                continue
            record = {
                **face_crop(frame, landmarks[t], boxes[t], size, cfg.data),
                "crop_box": boxes[t],
                "source_size": np.array(source_size, np.int32),
                "audio": windows[t],
                "frame_index": np.int32(t),  # in the source video at 25 fps
            }
            for name, value in record.items():
                buffer.setdefault(name, []).append(value)
            if len(buffer["frame"]) >= chunk_frames:
                yield flush()
    except MediaError as e:
        raise SkipVideo(str(e)) from e
    if buffer:
        yield flush()


def make_frame_landmarker(cfg: PreprocessConfig) -> Callable | None:
    return None if cfg.landmarks == "sidecar" else make_landmarker(cfg.landmarks)


@dataclasses.dataclass(frozen=True)
class VideoResult:
    path: str
    video_id: str
    status: str  # written | skipped | exists
    frames: int = 0
    reason: str = ""


def safe_id(video_id: str) -> str:
    """A shard name for any file name: `identity/clip` -> `identity+clip` when that is plain
    ASCII (so datasets written before keep their ids); otherwise an ASCII slug of it plus 8
    hex digits of its SHA-1, deterministic and collision-free in practice. The original name
    stays in the records' sidecar and video index (`source`)."""
    from dithead_jax.data.records import valid_id  # TFDS: only when records are written

    base = video_id.replace("/", "+")
    if valid_id(base):
        return base
    ascii_text = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9._+=-]+", "_", ascii_text).strip("._-=+")[:80]
    digest = hashlib.sha1(video_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else f"v-{digest}"


def record_id(video_id: str, segment: int) -> str:
    """Dataset ids (`safe_id`); later face segments get '.sK'."""
    base = safe_id(video_id)
    return base if segment == 0 else f"{base}.s{segment}"


def preprocess_video(
    path: Path,
    root: Path,
    writer: Any,
    split_of: Callable[[str], str],
    cfg: PreprocessConfig,
    featurizer: AudioFeaturizer,
    landmarker: Callable | None,
) -> VideoResult:
    """Processes one video into `writer` (a records.DatasetWriter); never raises for bad input."""
    identity, video_id = video_key(root, path)
    if writer.has_video(record_id(video_id, 0)):
        return VideoResult(str(path), video_id, "exists")
    split = split_of(identity)
    written = 0
    # The speech and the video's path (data/sources.py) land before any shard is finished.
    source_id = record_id(video_id, 0)

    def keep_speech(speech: np.ndarray) -> None:
        write_source(writer.out_dir, source_id, speech, path)

    try:
        chunks = process_video(path, cfg, featurizer, landmarker, on_speech=keep_speech)
        for index, (segment, group) in enumerate(itertools.groupby(chunks, key=lambda c: c[0])):
            shard_id = record_id(video_id, index)
            length = segment.stop - segment.start
            with writer.video_writer(
                split, shard_id, identity=identity, num_frames=length, source=video_id
            ) as shard:
                for _, chunk in group:
                    shard.write(chunk)
            written += length
    except SkipVideo as e:
        remove_source(writer.out_dir, source_id)
        return VideoResult(str(path), video_id, "skipped", reason=str(e))
    except ValueError as e:  # the writer refused it: one video lost, never the whole batch
        remove_source(writer.out_dir, source_id)
        return VideoResult(str(path), video_id, "skipped", reason=f"cannot write records: {e}")
    return VideoResult(str(path), video_id, "written", frames=written)
