"""Grain pipeline of frame triplets for the frame interpolator (IFNet, stage 3), from
stage-1 frame records: self-supervised, the middle frame of three is the answer.

One example per record position p that starts a run of 3 consecutive frames of one video
(`sync_windows.window_starts(index, 3)`), with the same global-index plumbing as the other
pipelines (`pipelines._pipeline`: process-count-independent order and augmentations,
resumable iterator state). Per example a span n is drawn uniformly from the `spans` that
fit at p (frames p..p+n consecutive in the same video; n = 2 always fits), then j in
1..n-1:

    img0      (S, S, 3)  float32 in [0, 1], frame p
    gt        (S, S, 3)  frame p + j: the frame to interpolate
    img1      (S, S, 3)  frame p + n
    timestep  ()         j / n

spans=(2,) gives RIFE's Vimeo-triplet setting, (p, p+1, p+2) at t = 0.5, which is also the
generation's use at 25 fps: `half_rate` interpolates across a 2-frame gap and `smooth`
rebuilds frame i from i-1 and i+1. Wider spans (n <= 4: t in {1/4, 1/3, 1/2, 2/3, 3/4})
teach arbitrary t and larger motion, as RIFE's septuplet training does.

Augmentations, as RIFE's training set applies them, all optional: one random (crop, crop)
window for the three frames, a horizontal flip, and temporal reversal (img0 <-> img1,
t -> 1 - t). RIFE's vertical flips and 90-degree rotations are left out: aligned face crops
are always upright, and the interpolator only ever sees upright faces.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dithead_jax.data import pipelines
from dithead_jax.data import records as records_lib
from dithead_jax.data.sync_windows import window_starts

TRIPLET = 3  # frames p, p+1, p+2: the shortest span


def fitting_spans(
    p: int, spans: Sequence[int], video_end: int, frame_index: np.ndarray
) -> list[int]:
    """The spans n of `spans` for which records p..p+n are consecutive frames of the video
    that ends (exclusive) at record `video_end`."""
    return [
        n for n in spans if p + n < video_end and int(frame_index[p + n]) - int(frame_index[p]) == n
    ]


class _TripletExample:
    """triplet number -> {img0, gt, img1, timestep} (see the module doc)."""

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        index: Mapping[str, np.ndarray],
        starts: np.ndarray,
        spans: Sequence[int],
        crop: int,
        random_flip: bool,
        random_reverse: bool,
    ):
        self.source, self.starts, self.spans = source, starts, tuple(sorted(spans))
        self.crop, self.random_flip, self.random_reverse = crop, random_flip, random_reverse
        self.frame_index = index["frame_index"].astype(np.int64)
        self.video_end = np.repeat(index["start"] + index["length"], index["length"])

    def __call__(self, number: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p = int(self.starts[number])
        spans = fitting_spans(p, self.spans, int(self.video_end[p]), self.frame_index)
        n = spans[rng.integers(len(spans))] if len(spans) > 1 else spans[0]
        j = 1 + int(rng.integers(n - 1)) if n > 2 else 1
        frames = np.stack(
            [np.asarray(self.source[p + k]["frame"], np.float32) for k in (0, j, n)]
        ) / np.float32(255.0)
        timestep = j / n
        if self.crop:
            size = frames.shape[1:3]
            if self.crop > min(size):
                raise ValueError(f"crop {self.crop} is larger than the {size[0]}px frames")
            y, x = (int(rng.integers(s - self.crop + 1)) for s in size)
            frames = frames[:, y : y + self.crop, x : x + self.crop]
        if self.random_flip and rng.random() < 0.5:
            frames = frames[:, :, ::-1]
        if self.random_reverse and rng.random() < 0.5:
            # The same motion played backwards: the middle frame sits at 1 - t from img1.
            frames, timestep = frames[::-1], 1.0 - timestep
        frames = np.ascontiguousarray(frames)
        return {
            "img0": frames[0],
            "gt": frames[1],
            "img1": frames[2],
            "timestep": np.float32(timestep),
        }


def triplet_dataset(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    spans: Sequence[int] = (2,),
    crop: int = 0,
    random_flip: bool = True,
    random_reverse: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    host_rows: pipelines.Rows | None = None,
    read_threads: int = 8,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
    """Batches {img0, gt, img1: (B, S, S, 3) float32 in [0, 1]; timestep: (B,) float32},
    this process's rows of each global batch (see `pipelines.vqgan_dataset`).

    spans: frame distances n between img0 and img1 (each >= 2); a held-out evaluation
    passes spans=(2,), shuffle=False and no augmentation: every (p, p+1, p+2) at t = 0.5
    once, in record order.
    """
    if not spans or any(int(n) < 2 for n in spans):
        raise ValueError(f"spans must be frame distances >= 2, got {tuple(spans)}")
    records_lib.require_kind(data_dir, "stage1", "the frame interpolator")
    # Only the frames are read: masked frames and masks stay undecoded bytes.
    source, _ = records_lib.open_dataset(data_dir, split, skip_decoding=("masked_frame", "mask"))
    index = records_lib.load_video_index(data_dir, split)
    starts = window_starts(index, TRIPLET)
    if not len(starts):
        raise ValueError(f"{data_dir}: split {split!r} has no run of {TRIPLET} frames")
    example = _TripletExample(source, index, starts, spans, crop, random_flip, random_reverse)
    return pipelines._pipeline(  # noqa: SLF001 -- the shared plumbing, one definition
        len(starts),
        example,
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
