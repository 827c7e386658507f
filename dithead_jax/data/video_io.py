"""Video and audio I/O through PyAV (FFmpeg's libraries, bundled in the wheel).

Writers always go to a temporary name in the destination folder and are renamed into place
when complete, so an interrupted job never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class MediaError(RuntimeError):
    """A media file that cannot be read or written; the message names the file."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the finished file the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int,
    audio: np.ndarray | None = None,
    sample_rate: int = 16_000,
    crf: int = 18,
) -> None:
    """Writes H.264 (yuv420p) video with an optional mono AAC track, atomically.

    frames: (T, H, W, 3) uint8 RGB with even H and W. audio: (N,) float in [-1, 1]; it is
    padded or trimmed to exactly T / fps seconds, because a muxer cut with `-shortest` can
    drop video frames, and a long audio tail would make the two durations disagree.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"{path}: frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
        )
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264 4:2:0 needs even frame sizes, got {width}x{height}")
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": str(crf), "preset": "medium"}
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=sample_rate)
            audio_stream.layout = "mono"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio_stream is not None:
            target = round(num_frames * sample_rate / fps)
            samples = np.zeros(target, np.float32)
            samples[: min(target, len(audio))] = np.asarray(audio, np.float32)[:target]
            chunk = 1024  # one AAC frame per av.AudioFrame
            for start in range(0, target, chunk):
                piece = samples[start : start + chunk][None, :]
                af = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(piece), format="flt", layout="mono"
                )
                af.sample_rate = sample_rate
                af.pts = start
                af.time_base = Fraction(1, sample_rate)
                for packet in audio_stream.encode(af):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)


@dataclasses.dataclass(frozen=True)
class Media:
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float
    audio: np.ndarray | None  # (N,) float32 mono in [-1, 1]
    sample_rate: int | None


def read_video(path: str | os.PathLike, sample_rate: int | None = None) -> Media:
    """Decodes every frame (RGB) and the first audio track (mono float32, optionally resampled)."""
    try:
        with av.open(str(path)) as container:
            vstream, fps = _video_stream(container, path)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(vstream)]
        audio, rate = read_audio(path, sample_rate, required=False)
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode ({e})") from e
    if not frames:
        raise MediaError(f"{path}: no decodable video frames")
    return Media(np.stack(frames), fps, audio, rate)


def read_audio(
    path: str | os.PathLike, sample_rate: int | None = None, required: bool = True
) -> tuple[np.ndarray | None, int | None]:
    """First audio track as mono float32; resampled to `sample_rate` if given."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                if required:
                    raise MediaError(f"{path}: no audio stream")
                return None, None
            stream = container.streams.audio[0]
            rate = sample_rate or stream.rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = []
            for frame in container.decode(stream):
                chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
            chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
            # The decoder returns whole AAC frames (1024 samples): cut the padding the
            # container's edit list declares, so audio and video durations agree.
            declared = stream.duration * stream.time_base if stream.duration else None
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode audio ({e})") from e
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if declared is not None:
        audio = audio[: round(float(declared) * rate)]
    return audio, rate


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    height: int
    width: int
    fps: float
    duration: float  # seconds; 0.0 when the container does not say
    frames: int  # as declared by the container; 0 when unknown
    has_audio: bool


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike):
    if not container.streams.video:
        raise MediaError(f"{path}: no video stream")
    stream = container.streams.video[0]
    return stream, float(stream.average_rate or stream.guessed_rate or 0)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Stream parameters without decoding frames."""
    try:
        with av.open(str(path)) as container:
            stream, fps = _video_stream(container, path)
            if stream.duration is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = (stream.frames or 0) / fps if fps else 0.0
            return VideoInfo(
                stream.height, stream.width, fps, duration, stream.frames or 0,
                bool(container.streams.audio),
            )  # fmt: skip
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot open ({e})") from e


def iter_frames_at_fps(path: str | os.PathLike, fps: float) -> Iterator[np.ndarray]:
    """Decodes frames resampled to a constant `fps` (RGB uint8), streaming.

    Output frame k shows what the source showed at time k / fps: the latest source frame
    whose presentation time is <= that time. This is exact for variable-frame-rate input
    (phone videos) and duplicates or drops frames for constant-rate input at another rate.
    Only one decoded frame is held at a time, so long videos do not fill memory.
    """
    try:
        with av.open(str(path)) as container:
            stream, _ = _video_stream(container, path)
            stream.thread_type = "AUTO"
            start = None
            k = 0
            previous = None
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if start is None:
                    start = frame.time
                t = frame.time - start
                # Emit outputs whose time falls before this frame: they show `previous`.
                while previous is not None and k / fps < t - 1e-6:
                    yield previous
                    k += 1
                previous = frame.to_ndarray(format="rgb24")
            if previous is not None:
                # The last source frame lasts one source interval.
                rate = float(stream.average_rate or fps)
                end = (t if start is not None else 0.0) + 1.0 / rate
                while k / fps < end - 1e-6:
                    yield previous
                    k += 1
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode ({e})") from e
