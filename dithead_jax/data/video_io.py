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
from typing import Any

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


# Containers store times in ticks (WebM/MKV: whole milliseconds): an instant within 1 ms of
# an output frame's counts as that instant, so rounding never shifts a frame by one.
TIME_TOLERANCE_S = 1e-3


class FrameClock:
    """The one rule that turns source frames (any, even variable, frame rate) into `fps`.

    Output frame k is the instant k / fps from the first source frame; it shows the latest
    source frame whose presentation time is <= that instant. The video lasts until its last
    frame ends (that frame's time plus its own duration), and output frames are the instants
    before that end. `iter_frames_at_fps` drives it while decoding; `frame_schedule` on a
    list of times. Every reader (preprocessing, sample.py, HDTF clips) goes through it.
    """

    def __init__(self, fps: float):
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.fps = float(fps)
        self.emitted = 0  # output frames so far
        self._started = False

    def next_frame(self, t: float) -> int:
        """A source frame starts at `t` seconds (from the first frame, non-decreasing): the
        number of output frames still owed to the frame before it."""
        return self._until(t) if self._started else self._start()

    def end(self, t: float) -> int:
        """The last source frame ends at `t`: the output frames still owed to it."""
        return self._until(t) if self._started else 0

    def _start(self) -> int:
        self._started = True
        return 0

    def _until(self, t: float) -> int:
        count = 0
        while self.emitted / self.fps < t - TIME_TOLERANCE_S:
            self.emitted += 1
            count += 1
        return count


def frame_schedule(times: np.ndarray, end: float, fps: float) -> np.ndarray:
    """`FrameClock` on known times: the source frame index each output frame shows.

    times: (N,) seconds, non-decreasing, times[0] the video's start; end: when the last
    frame stops showing. Returns (M,) int64, M = the number of output frames.
    """
    times = np.asarray(times, np.float64)
    clock, shown = FrameClock(fps), []
    for i, t in enumerate(times):
        shown += [i - 1] * clock.next_frame(t - times[0])
    if len(times):
        shown += [len(times) - 1] * clock.end(end - times[0])
    return np.asarray(shown, np.int64)


def _frame_duration(frame: av.VideoFrame, stream: Any) -> float:
    """How long `frame` shows: its own duration where the container says (VFR files do),
    else one interval of the stream's average rate."""
    if frame.duration and frame.time_base:
        return float(frame.duration * frame.time_base)
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    return 1.0 / rate if rate else 0.0


def iter_frames_at_fps(path: str | os.PathLike, fps: float) -> Iterator[np.ndarray]:
    """Decodes frames resampled to a constant `fps` (RGB uint8) by `FrameClock`, streaming.

    Exact for variable-frame-rate input (phone videos); duplicates or drops frames for
    constant-rate input at another rate. Only one decoded frame is held at a time, so long
    videos do not fill memory.
    """
    try:
        with av.open(str(path)) as container:
            stream, _ = _video_stream(container, path)
            stream.thread_type = "AUTO"
            clock = FrameClock(fps)
            start = None
            previous = last = None
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if start is None:
                    start = frame.time
                for _ in range(clock.next_frame(frame.time - start)):
                    yield previous
                previous, last = frame.to_ndarray(format="rgb24"), frame
            if last is not None:
                end = last.time - start + _frame_duration(last, stream)
                for _ in range(clock.end(end)):
                    yield previous
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode ({e})") from e


def count_frames_at_fps(path: str | os.PathLike, fps: float) -> int:
    """How many frames `iter_frames_at_fps(path, fps)` yields, from packet times alone (no
    decoding; `FrameClock`'s rule); 0 for a file without video packets."""
    try:
        with av.open(str(path)) as container:
            stream, _ = _video_stream(container, path)
            spans = [
                (float(p.pts * p.time_base), float((p.duration or 0) * p.time_base))
                for p in container.demux(stream)
                if p.size and p.pts is not None
            ]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot open ({e})") from e
    if not spans:
        return 0
    spans.sort()
    last, duration = spans[-1]
    end = last + (duration or (1.0 / rate if rate else 0.0))
    return len(frame_schedule(np.array([t for t, _ in spans]), end, fps))
