"""Grain input pipelines for both training stages, over the records of `data/records.py`.

Both pipelines have the same shape; every process builds the same *global* index stream
and reads only its own rows of each global batch:

    MapDataset.range(n)                record positions
      .shuffle(seed)                   a new permutation every epoch (grain reseeds per epoch)
      .batch(global_batch, drop_remainder=True) .repeat(num_epochs)
                                       global batches of positions: batch k is step k+1's
      .map_with_index(_HostRows)       rows [start, stop) of batch k only, read and decoded;
                                       row j's augmentation rng is a pure function of
                                       (seed, k, j), never of the host
      .to_iter_dataset(ReadOptions)    threads read ahead; order stays deterministic
      [.mp_prefetch(workers)]          optional worker processes

so global batch k is a function of (seed, global batch size, k) alone: a run on 1 process
and one on 2 see the same examples in the same order with the same augmentations, and
the iterator's state (`{"next_index": k}` without workers) is the same on every process.
That is what lets a checkpoint written by H processes resume on H' (`training/checkpoint.py`
saves one copy of it).

Host rows: process p of H holds rows [p*B/H, (p+1)*B/H) of each global batch -- the rows
its addressable devices hold in the batch sharding when `jax.make_mesh` lays out each
process's devices contiguously (`training.loop.host_rows` derives them from the sharding
and refuses a layout where they are not contiguous). `make_global_batch` then assembles
the hosts' rows into one global `jax.Array` sharded over the mesh's data axes.

Worker processes (`worker_count > 0`): grain starts them with the `spawn` method, so the
dataset must pickle (all transforms here are module-level classes) and the entry script must
guard its work with `if __name__ == "__main__":`. Grain reads absl flags inside workers;
`_ensure_absl_flags` marks them parsed (with defaults) when the program did not run
`absl.app.run`, which otherwise fails with `UnparsedFlagAccessError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import grain
import jax
import numpy as np
from absl import flags

from dithead_jax.data import records as records_lib

Target = Literal["frames", "masked"]
Rows = tuple[int, int]


# ---------------------------------------------------------------------------------------
# Shared plumbing


def _ensure_absl_flags() -> None:
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def default_host_rows(
    global_batch: int, index: int | None = None, count: int | None = None
) -> Rows:
    """Rows [p*B/H, (p+1)*B/H) of each global batch for process p of H (default: this one)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process index {index} not in [0, {count})")
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} does not split over {count} processes")
    per_host = global_batch // count
    return index * per_host, (index + 1) * per_host


class _HostRows(grain.transforms.MapWithIndex):
    """(global batch index k, positions (B,)) -> this host's rows [start, stop), decoded by
    `example(position, rng)` and stacked; row j's rng is seeded by (seed, k, j)."""

    def __init__(self, example: Any, rows: Rows, seed: int):
        self.example, self.rows, self.seed = example, rows, seed

    def map_with_index(self, k: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        start, stop = self.rows
        examples = [
            self.example(int(positions[j]), np.random.default_rng([self.seed, k, j]))
            for j in range(start, min(stop, len(positions)))
        ]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def _pipeline(
    num_records: int,
    example: Any,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    drop_remainder: bool,
    rows: Rows | None,
    read_threads: int,
    prefetch_batches: int,
    worker_count: int,
    worker_buffer_size: int,
) -> grain.IterDataset:
    rows = default_host_rows(batch_size) if rows is None else tuple(rows)
    if not 0 <= rows[0] < rows[1] <= batch_size:
        raise ValueError(f"host rows {rows} are not a range inside the batch of {batch_size}")
    if not drop_remainder and rows != (0, batch_size):
        # A short last batch cannot be split into equal host slices.
        raise ValueError("drop_remainder=False needs one process reading whole batches")
    ds = grain.MapDataset.range(num_records)
    if shuffle:
        ds = ds.shuffle(seed=_mix(seed, 0))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if len(ds) == 0:
        raise ValueError(f"{num_records} records make no global batch of {batch_size}")
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_HostRows(example, rows, _mix(seed, 1)))
    # Elements are whole batches here, so the read-ahead buffer counts batches (grain's
    # default of 500 elements would hold 500 batches in memory).
    # More threads than buffer slots cannot run in parallel (grain warns), hence the min.
    threads = max(1, min(read_threads, prefetch_batches))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch_batches)
    )
    if worker_count > 0:
        _ensure_absl_flags()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return it


def _mix(seed: int, stream: int) -> int:
    """Independent 32-bit seeds for the shuffle (stream 0) and the augmentations (1)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------
# Stage 1: VQGAN images


class _ImageExample:
    """record position -> {"image": float32 (S, S, 3) in [-1, 1]} (+ "mask": float32 (S, S)
    alpha in [0, 1] when with_mask), optionally mirrored, or a random (crop, crop) window."""

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        key: str,
        random_flip: bool,
        crop: int = 0,
        with_mask: bool = False,
    ):
        self.source, self.key, self.random_flip = source, key, random_flip
        self.crop, self.with_mask = crop, with_mask

    def __call__(self, position: int, rng: np.random.Generator) -> dict:
        record = self.source[position]
        example = {"image": np.asarray(record[self.key], np.float32) / 127.5 - 1.0}
        if self.with_mask:
            example["mask"] = np.asarray(record["mask"], np.float32) / 255.0
        if self.crop:
            size = example["image"].shape[:2]
            if self.crop > min(size):
                raise ValueError(f"crop {self.crop} is larger than the {size[0]}px frames")
            y, x = (int(rng.integers(n - self.crop + 1)) for n in size)
            example = {k: v[y : y + self.crop, x : x + self.crop] for k, v in example.items()}
        # Faces are left-right symmetric enough; the mask hull and audio do not care.
        if self.random_flip and rng.random() < 0.5:
            example = {k: v[:, ::-1] for k, v in example.items()}
        return {k: np.ascontiguousarray(v) for k, v in example.items()}


def vqgan_dataset(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    target: Target = "frames",
    random_flip: bool = True,
    crop: int = 0,
    with_mask: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    host_rows: Rows | None = None,
    read_threads: int = 8,
    prefetch_batches: int = 8,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
) -> grain.IterDataset:
    """Stage-1 batches {"image": float32 (B, S, S, 3) in [-1, 1]} (NHWC).

    target: "frames" (ground-truth VQGAN E/D) or "masked" (masked-frame encoder E_m).
    crop: train on random (crop, crop) windows instead of whole frames (0 = whole).
    with_mask: also yield "mask", float32 (B, S, S) lower-face alpha in [0, 1]
    (for the mask-weighted L1), cropped and mirrored with the image.
    batch_size is the GLOBAL batch; this process gets rows host_rows = [start, stop) of
    each (default `default_host_rows`: an equal contiguous share per process).
    num_epochs=None repeats forever.
    """
    key = {"frames": "frame", "masked": "masked_frame"}.get(target)
    if key is None:
        raise ValueError(f"target must be 'frames' or 'masked', got {target!r}")
    other = "masked_frame" if key == "frame" else "frame"
    # Undecoded bytes for what this stage never looks at: saves a JPEG decode per sample.
    skip = (other,) if with_mask else (other, "mask")
    records_lib.require_kind(data_dir, "stage1", "the VQGAN")
    source, _ = records_lib.open_dataset(data_dir, split, skip_decoding=skip)
    return _pipeline(
        len(source),
        _ImageExample(source, key, random_flip, crop, with_mask),
        seed=seed,
        shuffle=shuffle,
        rows=host_rows,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
        num_epochs=num_epochs,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
    )


# ---------------------------------------------------------------------------------------
# Stage 2: DiT latents with a same-video reference


def choose_reference(
    position: int,
    start: int,
    length: int,
    frame_index: np.ndarray,
    min_distance: int,
    rng: np.random.Generator,
) -> int:
    """Record position of a reference frame for the target at `position`.

    Candidates are the records of the same video (positions start..start+length-1) whose
    `frame_index` differs from the target's by at least `min_distance` frames (the paper's
    60); one is drawn uniformly. Short videos: if no frame is that far, the farthest frame
    is taken (earliest one on a tie) -- still a different pose, never a failure; a video of
    one frame is its own reference.
    """
    frames = frame_index[start : start + length].astype(np.int64)
    distance = np.abs(frames - frames[position - start])
    candidates = np.flatnonzero(distance >= min_distance)
    if candidates.size:
        return start + int(candidates[rng.integers(candidates.size)])
    return start + int(np.argmax(distance))


class _LatentExample:
    """record position -> {latent, masked_latent, reference_latent, audio (, mask)
    (, landmarks)} (see dit_dataset)."""

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        index: dict[str, np.ndarray],
        d: int,
        with_mask: bool = False,
        with_landmarks: bool = False,
    ):
        self.source, self.min_distance, self.with_mask = source, d, with_mask
        self.with_landmarks = with_landmarks
        self.frame_index = index["frame_index"]
        self.start, self.length = index["start"], index["length"]
        self.video_of = np.repeat(np.arange(len(self.start)), self.length)

    def __call__(self, position: int, rng: np.random.Generator) -> dict:
        record = self.source[position]
        video = self.video_of[position]
        ref = choose_reference(
            position,
            int(self.start[video]),
            int(self.length[video]),
            self.frame_index,
            self.min_distance,
            rng,
        )
        variants = record["masked_latents"]
        example = {
            "latent": np.asarray(record["latent"], np.float32),
            "masked_latent": np.asarray(variants[rng.integers(len(variants))], np.float32),
            "reference_latent": np.asarray(self.source[ref]["latent"], np.float32),
            "audio": np.asarray(record["audio"], np.float32),
        }
        if self.with_mask:
            example["mask"] = np.asarray(record["mask"], np.float32) / 255.0
        if self.with_landmarks:
            example["landmarks"] = np.asarray(record["landmarks"], np.float32)
        return example


def dit_dataset(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    min_reference_distance: int = 60,
    with_mask: bool = False,
    with_landmarks: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    host_rows: Rows | None = None,
    read_threads: int = 8,
    prefetch_batches: int = 8,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
) -> grain.IterDataset:
    """Stage-2 batches, all float32, this process's rows of each global batch (B = its
    share of batch_size, see `vqgan_dataset`):

        latent            (B, h, w, c)  pre-quantisation latent of the target frame
        masked_latent     (B, h, w, c)  one of the K masked variants (each its own random
                                        mask shift, variant 0 unshifted), at random
        reference_latent  (B, h, w, c)  latent of a frame of the same video at least
                                        min_reference_distance frames away
                                        (`choose_reference`)
        audio             (B, W, D)
        mask              (B, h, w)     with_mask only: the target frame's lower-face
                                        alpha in [0, 1] on the latent grid, unshifted:
                                        the loss weighs where the target's mouth is,
                                        whichever shifted mask hid it
        landmarks         (B, n, 2)     with_landmarks only: the target frame's
                                        DiffTalk landmarks in [0, 1] crop coordinates
                                        (DiffTalk conditions on the frame it generates)

    Arguments as in `vqgan_dataset`; pass `DataConfig.min_reference_distance`.
    """
    records_lib.require_kind(data_dir, "stage2", "the DiT")
    source, features = records_lib.open_dataset(data_dir, split)
    if with_mask and "mask" not in features:
        raise ValueError(
            f"{data_dir}: these latent records have no 'mask' (written before masks were "
            "stored); re-run data/encode_latents.py to use a mask-weighted loss"
        )
    if with_landmarks and "landmarks" not in features:
        raise ValueError(
            f"{data_dir}: these latent records have no 'landmarks' (written before they were "
            "stored); re-run data/encode_latents.py to use model.landmark_tokens"
        )
    index = records_lib.load_video_index(data_dir, split)
    if int(index["length"].sum()) != len(source):
        raise ValueError(f"{data_dir}: video index and split '{split}' disagree; re-finalize")
    return _pipeline(
        len(source),
        _LatentExample(source, index, min_reference_distance, with_mask, with_landmarks),
        seed=seed,
        shuffle=shuffle,
        rows=host_rows,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
        num_epochs=num_epochs,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
    )


# ---------------------------------------------------------------------------------------
# Host batches -> global arrays


def make_global_batch(
    host_batch: Mapping[str, np.ndarray],
    sharding: jax.sharding.NamedSharding,
    global_batch: int | None = None,
) -> dict[str, jax.Array]:
    """Assembles every host's (B_host, ...) arrays into global (global_batch, ...) arrays
    (default global_batch: B_host * hosts, i.e. no two processes hold the same rows).

    `sharding` splits the leading (batch) dimension over the mesh's data axes, e.g.
    `NamedSharding(mesh, P(("data", "fsdp")))`; each host passes only its own rows, which
    must be the rows its addressable devices hold (true for a contiguous process layout,
    the default for `jax.make_mesh`).
    """
    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        shape = None if global_batch is None else (global_batch, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out
