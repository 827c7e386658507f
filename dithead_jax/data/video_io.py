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


class _TempBeside:
    """A temporary file beside `path` that becomes `path` on `commit` (a rename), or
    disappears on `discard`: readers never see a half-written file under the real name."""

    def __init__(self, path: str | os.PathLike, suffix: str | None = None):
        self.target = Path(path)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.target.stem}.", suffix=suffix or self.target.suffix,
            dir=self.target.parent,
        )  # fmt: skip
        os.close(fd)
        self.path = Path(tmp)

    def commit(self) -> None:
        # mkstemp creates 0600; give the finished file the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o666 & ~umask)
        os.replace(self.path, self.target)

    def discard(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` only on success."""
    tmp = _TempBeside(path, suffix)
    try:
        yield tmp.path
        tmp.commit()
    finally:
        tmp.discard()


AAC_FRAME = 1024  # samples per AAC frame: audio is fed to the encoder one frame at a time


class VideoWriter:
    """Writes H.264 (yuv420p) video with an optional mono AAC track, frames as they come.

        with VideoWriter("out.mp4", fps=25, audio=speech, sample_rate=16_000) as out:
            for chunk in chunks:
                out.write(chunk)  # (T, H, W, 3) or (H, W, 3) uint8 RGB, even H and W

    Only the encoder's own lookahead is held, so memory does not grow with the video. The
    file is written under a temporary name and renamed on a clean exit; an exception (or
    `abort`) leaves nothing. `audio` (N,) float in [-1, 1] is padded or trimmed at close
    to exactly frames / fps seconds, because a muxer cut with `-shortest` can drop video
    frames and a long audio tail would make the two durations disagree; it is encoded
    alongside the frames it covers, so the two streams interleave in the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: int,
        audio: np.ndarray | None = None,
        sample_rate: int = 16_000,
        crf: int = 18,
    ):
        self.path, self.fps, self.sample_rate, self.crf = Path(path), fps, sample_rate, crf
        self.audio = None if audio is None else np.asarray(audio, np.float32).reshape(-1)
        self.frames = 0  # written so far
        self._audio_done = 0  # samples already given to the AAC encoder
        self._video = self._audio_stream = None  # added at the first frame (its size)
        self._tmp = _TempBeside(path)
        try:
            self._container = av.open(str(self._tmp.path), mode="w", format="mp4")
        except BaseException:
            self._tmp.discard()
            raise

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"{self.path}: frames must be (T, H, W, 3) uint8, got "
                             f"{frames.shape} {frames.dtype}")  # fmt: skip
        if self._video is None:
            self._open_streams(*frames.shape[1:3])
        elif frames.shape[1:3] != (self._video.height, self._video.width):
            raise ValueError(f"{self.path}: frame size {frames.shape[2]}x{frames.shape[1]} "
                             f"after {self._video.width}x{self._video.height}")  # fmt: skip
        for frame in frames:
            self._mux(self._video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += len(frames)
        # Whole AAC frames the video written so far covers (the rest waits for close).
        covered = self.frames * self.sample_rate // self.fps
        self._encode_audio(covered // AAC_FRAME * AAC_FRAME)

    def close(self) -> Path:
        """Flushes both encoders, closes the file and renames it into place; its path."""
        try:
            if self._video is None:
                raise ValueError(f"{self.path}: no frames to write")
            self._mux(self._video.encode())
            self._encode_audio(round(self.frames * self.sample_rate / self.fps))
            if self._audio_stream is not None:
                self._mux(self._audio_stream.encode())
            self._container.close()
            self._tmp.commit()
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drops everything written: no file is left under either name."""
        with contextlib.suppress(Exception):
            self._container.close()
        self._tmp.discard()

    def _open_streams(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"{self.path}: H.264 4:2:0 needs even frame sizes, got "
                             f"{width}x{height}")  # fmt: skip
        video = self._container.add_stream("libx264", rate=self.fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": str(self.crf), "preset": "medium"}
        if self.audio is not None:
            self._audio_stream = self._container.add_stream("aac", rate=self.sample_rate)
            self._audio_stream.layout = "mono"
        self._video = video

    def _encode_audio(self, until: int) -> None:
        """Feeds samples [done, until) to the AAC encoder, one AAC frame per av.AudioFrame
        (zeros past the end of the speech), always on the same 1024-sample grid."""
        if self._audio_stream is None:
            return
        for start in range(self._audio_done, until, AAC_FRAME):
            piece = np.zeros(min(AAC_FRAME, until - start), np.float32)
            have = self.audio[start : start + len(piece)]
            piece[: len(have)] = have
            frame = av.AudioFrame.from_ndarray(piece[None], format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = start
            frame.time_base = Fraction(1, self.sample_rate)
            self._mux(self._audio_stream.encode(frame))
        self._audio_done = max(self._audio_done, until)

    def _mux(self, packets: Any) -> None:
        for packet in packets:
            self._container.mux(packet)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int,
    audio: np.ndarray | None = None,
    sample_rate: int = 16_000,
    crf: int = 18,
) -> None:
    """Writes `frames` (T, H, W, 3) uint8 RGB, even H and W, with an optional mono AAC
    track, atomically: `VideoWriter` on an array held whole."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"{path}: frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
        )
    with VideoWriter(path, fps, audio, sample_rate, crf) as writer:
        writer.write(frames)


class FrameSpool:
    """Same-size uint8 frames appended to an unnamed temporary file and read back by index.

    For videos too long to hold: the pages live in the OS file cache, which does not count
    towards (and is reclaimed before) process memory, and each read copies one frame into
    a fresh array. The file disappears when the spool is closed or collected.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        # Held open for the spool's life (closed by `close`); unnamed, so nothing is left
        # behind even if the process dies.
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115
        self.shape: tuple[int, ...] | None = None
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def append(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame, np.uint8)
        if self.shape is None:
            self.shape = frame.shape
        elif frame.shape != self.shape:
            raise ValueError(f"spooled frames must all be {self.shape}, got {frame.shape}")
        self._file.seek(self.count * frame.nbytes)
        self._file.write(memoryview(frame).cast("B"))
        self.count += 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.count <= i < self.count:
            raise IndexError(f"frame {i} of {self.count}")
        out = np.empty(self.shape, np.uint8)
        self._file.seek((i % self.count) * out.nbytes)
        if self._file.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise OSError("the frame spool was truncated")
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FrameSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
