"""What a stage-1 dataset keeps of each source video besides its per-frame records: the
video's 16 kHz speech and where the video itself is. With them an evaluation scores lip sync
(LSE-C / LSE-D) on any held-out identity, not only on the synthetic set whose speech lies
beside it, and pastes generated faces back into the original frames (the paper's protocol).

One file per source video, `<dataset>/sources/<safe id>.npz` (the id of the video's first
shard), written before any of its shards is marked finished, so a finished video always has
it:

    speech          int16 (N,)  mono 16 kHz, N = frames x 640 (the sound under the video's
                                25 fps frames: trimmed, or zero-padded at the end), before
                                the peak normalisation the audio features get. int16 is
                                what SyncNet's published LSE scripts read (ffmpeg pcm_s16le)
                                and half the bytes of float32: ~115 MB per hour of video.
    video           str         the source video's path relative to the dataset folder
    video_absolute  str         its absolute path when it was preprocessed (used when the
                                relative one does not lead to it: the dataset moved alone)

The dataset's metadata says which layout it has: provenance["speech"] = `SPEECH_LAYOUT`.
Datasets made before this have no such key and no sources/ folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dithead_jax.data.video_io import MediaError, atomic_path, iter_frames_at_fps

SOURCES_SUBDIR = "sources"
SPEECH_LAYOUT = "sources/<video>.npz: int16 mono 16 kHz speech and the source video's path"
SAMPLE_RATE = 16_000


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """int16 samples as ffmpeg's pcm_s16le writes them: float x -> rint(32768 x), clipped;
    int16 input passes through."""
    audio = np.asarray(audio).reshape(-1)
    if audio.dtype == np.int16:
        return audio
    if not np.issubdtype(audio.dtype, np.floating):
        raise TypeError(f"audio must be float in [-1, 1] or int16, got {audio.dtype}")
    return np.clip(np.rint(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def dataset_root(dataset: str | os.PathLike) -> Path:
    """The writer's folder from either it or its TFDS `dataset/` subfolder."""
    path = Path(dataset)
    return path.parent if (path / "dataset_info.json").is_file() else path


def source_file(dataset: str | os.PathLike, source_id: str) -> Path:
    return dataset_root(dataset) / SOURCES_SUBDIR / f"{source_id}.npz"


def write_source(
    dataset: str | os.PathLike, source_id: str, speech: np.ndarray, video: str | os.PathLike
) -> Path:
    """Stores one video's speech ((N,) float in [-1, 1] or int16 at 16 kHz) and its path,
    atomically; returns the file."""
    path = source_file(dataset, source_id)
    video = Path(video).resolve()
    relative = os.path.relpath(video, dataset_root(dataset).resolve())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, speech=to_pcm16(speech), video=relative, video_absolute=str(video))
    return path


def remove_source(dataset: str | os.PathLike, source_id: str) -> None:
    """Drops the file of a video that ended up without records."""
    source_file(dataset, source_id).unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Source:
    """What the dataset knows of one source video; None where it does not know it, with
    the reason in `speech_missing` / `video_missing`."""

    speech: np.ndarray | None  # (N,) int16, 16 kHz
    video: Path | None  # the source video, found on disk
    speech_missing: str = ""
    video_missing: str = ""


def load_source(dataset: str | os.PathLike, source_id: str, layout: str | None) -> Source:
    """The speech and source video of `source_id`. layout: the dataset's provenance
    "speech" entry (None for datasets made before it: nothing is looked up)."""
    if layout is None:
        why = (
            f"{dataset} keeps no speech (made before stage 1 kept it: no 'speech' in its "
            "metadata's provenance); re-run data/preprocess.py on its videos"
        )
        return Source(None, None, why, why)
    path = source_file(dataset, source_id)
    if not path.is_file():
        why = f"{path}: not found (the speech and source-video path of {source_id})"
        return Source(None, None, why, why)
    with np.load(path) as z:
        speech = z["speech"]
        relative, absolute = str(z["video"]), str(z["video_absolute"])
    for candidate in (dataset_root(dataset) / relative, Path(absolute)):
        if candidate.is_file():
            return Source(speech, candidate)
    tried = f"{dataset_root(dataset) / relative} or {absolute}"
    return Source(speech, None, video_missing=f"source video not found ({tried})")


def speech_under(speech: np.ndarray, first_frame: int, frames: int, fps: int = 25) -> np.ndarray:
    """The speech under `frames` frames from source frame `first_frame`, as float32 in
    [-1, 1] (int16 / 32768: `to_pcm16` gives back the stored samples exactly)."""
    per_frame = SAMPLE_RATE // fps
    start = first_frame * per_frame
    return speech[start : start + frames * per_frame].astype(np.float32) / 32768.0


def frames_at(
    video: str | os.PathLike, frame_index: Iterable[int], fps: int = 25
) -> Iterator[np.ndarray]:
    """The source frames at `frame_index` (increasing, 25 fps numbering as stage 1 counted
    them), uint8 (H, W, 3) one at a time: a long video is decoded once and never held.
    Raises MediaError naming the file when it holds fewer frames."""
    wanted = iter(int(i) for i in frame_index)
    target = next(wanted, None)
    for t, frame in enumerate(iter_frames_at_fps(video, fps)):
        if target is None:
            return
        if t == target:
            yield frame
            target = next(wanted, None)
    if target is not None:
        raise MediaError(f"{video}: has no frame {target} at {fps} fps (stage 1 read one there)")
