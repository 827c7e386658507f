"""Grain pipelines of 5-frame runs: lip windows for the sync expert (stage-1 records), and
stage-2 batches in runs of 5 consecutive frames for the DiT's sync loss (`dit_group_dataset`).

One example per valid window start p (positions p..p+4 of one video, consecutive frame
indices), with the same global-index plumbing as `pipelines.py` (`pipelines._pipeline`:
process-count-independent order, resumable iterator state):

    frames         (5, S, S, 3)  float32 in [-1, 1], frames p..p+4
    audio          (W, D)        the audio window of the centre frame p+2 (in sync)
    shifted_audio  (W, D)        the same clip's window at centre p+2+k, with
                                 min_offset <= |k| <= max_offset drawn per example:
                                 a hard negative (same face, same voice, wrong time)

Other-clip negatives need no data: InfoNCE uses the rest of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dithead_jax.data import pipelines
from dithead_jax.data import records as records_lib
from dithead_jax.models.sync_expert import CENTRE, LIP_FRAMES


def window_starts(index: Mapping[str, np.ndarray], frames: int = LIP_FRAMES) -> np.ndarray:
    """Record positions p whose p..p+frames-1 are one video's consecutive frames, in order
    (5 for the lip windows; 3 for the interpolator's triplets, `vfi_triplets`)."""
    starts = []
    frame_index = index["frame_index"].astype(np.int64)
    for start, length in zip(index["start"], index["length"], strict=True):
        for p in range(int(start), int(start) + int(length) - frames + 1):
            if frame_index[p + frames - 1] - frame_index[p] == frames - 1:
                starts.append(p)
    return np.asarray(starts, np.int64)


def shifted_position(
    centre: int, start: int, length: int, min_offset: int, max_offset: int, rng: np.random.Generator
) -> int:
    """A position of the same video min_offset..max_offset records from `centre` (either
    side, uniform over those that exist); a clip too short for any: its farthest record."""
    offsets = np.arange(-max_offset, max_offset + 1)
    offsets = offsets[np.abs(offsets) >= min_offset]
    candidates = centre + offsets
    candidates = candidates[(candidates >= start) & (candidates < start + length)]
    if candidates.size:
        return int(candidates[rng.integers(candidates.size)])
    first, last = start, start + length - 1
    return first if centre - first >= last - centre else last


class _WindowExample:
    """window number -> {frames, audio, shifted_audio} (see the module doc)."""

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        index: Mapping[str, np.ndarray],
        starts: np.ndarray,
        min_offset: int,
        max_offset: int,
    ):
        self.source, self.starts = source, starts
        self.min_offset, self.max_offset = min_offset, max_offset
        self.start, self.length = index["start"], index["length"]
        self.video_of = np.repeat(np.arange(len(self.start)), self.length)

    def __call__(self, number: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p = int(self.starts[number])
        frames = np.stack(
            [np.asarray(self.source[p + t]["frame"], np.float32) for t in range(LIP_FRAMES)]
        )
        centre = p + CENTRE
        video = self.video_of[centre]
        other = shifted_position(
            centre,
            int(self.start[video]),
            int(self.length[video]),
            self.min_offset,
            self.max_offset,
            rng,
        )
        return {
            "frames": frames / 127.5 - 1.0,
            "audio": np.asarray(self.source[centre]["audio"], np.float32),
            "shifted_audio": np.asarray(self.source[other]["audio"], np.float32),
        }


def sync_window_dataset(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    min_offset: int = 2,
    max_offset: int = 15,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    host_rows: pipelines.Rows | None = None,
    read_threads: int = 8,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
    """Batches of {frames (B, 5, S, S, 3), audio (B, W, D), shifted_audio (B, W, D)}, all
    float32, this process's rows of each global batch (see `pipelines.vqgan_dataset`)."""
    records_lib.require_kind(data_dir, "stage1", "the sync expert")
    # Only frames and audio are read: the masked frame and mask stay undecoded bytes.
    source, _ = records_lib.open_dataset(data_dir, split, skip_decoding=("masked_frame", "mask"))
    index = records_lib.load_video_index(data_dir, split)
    starts = window_starts(index)
    if not len(starts):
        raise ValueError(f"{data_dir}: split {split!r} has no run of {LIP_FRAMES} frames")
    return pipelines._pipeline(  # noqa: SLF001 -- the shared plumbing, one definition
        len(starts),
        _WindowExample(source, index, starts, min_offset, max_offset),
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        rows=host_rows,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
        worker_count=0,
        worker_buffer_size=1,
    )


# ---------------------------------------------------------------------------------------
# Stage 2 in runs of 5: what the DiT's sync loss needs (SyncLossConfig)


class _GroupExample:
    """window number -> the stage-2 examples of positions p..p+4 stacked: (5, ...) each."""

    def __init__(self, frame_example: Any, starts: np.ndarray):
        self.frame_example, self.starts = frame_example, starts

    def __call__(self, number: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p = int(self.starts[number])
        frames = [self.frame_example(p + t, rng) for t in range(LIP_FRAMES)]
        return {k: np.stack([f[k] for f in frames]) for k in frames[0]}


class _FlattenGroups(grain.transforms.Map):
    """(G, 5, ...) -> (G * 5, ...): a plain stage-2 batch whose rows 5g..5g+4 are one clip's
    consecutive frames."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def dit_group_dataset(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    min_reference_distance: int = 60,
    host_rows: pipelines.Rows | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    read_threads: int = 8,
    prefetch_batches: int = 8,
    **example_options: bool,
) -> grain.IterDataset:
    """`pipelines.dit_dataset`'s batches (same keys and shapes; `example_options` are its
    with_mask / with_landmarks), but drawn as batch_size / 5 runs of 5 consecutive frames
    of one clip: rows 5g..5g+4 are frames p..p+4 of one video (each with its own masked
    variant and reference). batch_size and host_rows count frames, multiples of 5."""
    rows = pipelines.default_host_rows(batch_size) if host_rows is None else tuple(host_rows)
    if batch_size % LIP_FRAMES or rows[0] % LIP_FRAMES or rows[1] % LIP_FRAMES:
        raise ValueError(
            f"the sync loss needs batches of runs of {LIP_FRAMES} frames: global batch "
            f"{batch_size} and this process's rows {rows} must be multiples of {LIP_FRAMES}"
        )
    records_lib.require_kind(data_dir, "stage2", "the DiT")
    source, _ = records_lib.open_dataset(data_dir, split)
    index = records_lib.load_video_index(data_dir, split)
    starts = window_starts(index)
    if not len(starts):
        raise ValueError(f"{data_dir}: split {split!r} has no run of {LIP_FRAMES} frames")
    frame_example = pipelines._LatentExample(  # noqa: SLF001 -- one definition of an example
        source, index, min_reference_distance, **example_options
    )
    groups = pipelines._pipeline(  # noqa: SLF001
        len(starts),
        _GroupExample(frame_example, starts),
        batch_size=batch_size // LIP_FRAMES,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=True,
        rows=(rows[0] // LIP_FRAMES, rows[1] // LIP_FRAMES),
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
        worker_count=0,
        worker_buffer_size=1,
    )
    return groups.map(_FlattenGroups())
