"""Grain input pipelines for both training stages, over the records of `data/records.py`.

Both pipelines have the same shape:

    MapDataset.source(records)         random access (ArrayRecord via TFDS, no TensorFlow)
      [: n - n % hosts][host::hosts]   this host's disjoint, equal-sized slice of the records
      .seed(seed, host) .shuffle()     a new permutation every epoch
      .random_map(make_example)        decode + augment; rng is a pure function of the index
      .batch(per_host_batch, drop_remainder=True) .repeat(num_epochs)
      .to_iter_dataset(ReadOptions)    threads read ahead; order stays deterministic
      [.mp_prefetch(workers)]          optional worker processes

so the output for a given (seed, host, host count, batch size) is fixed, and an iterator's
`get_state()` / `set_state()` (or Orbax via `grain.checkpoint`) resumes it exactly.

Per-host sharding slices the record index space: host h of H sees records h, h+H, ...,
truncated so every host has the same count (and so the same number of batches per epoch,
which keeps multi-host steps in lockstep). Each host's seed is mixed with its index, so
augmentations are independent across hosts. `make_global_batch` then assembles the hosts'
batches into one global `jax.Array` sharded over the mesh's data axes.

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


# ---------------------------------------------------------------------------------------
# Shared plumbing


def _ensure_absl_flags() -> None:
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _host_shard(
    ds: grain.MapDataset, shard_index: int | None, shard_count: int | None
) -> tuple[grain.MapDataset, int]:
    """This host's strided slice (equal length on every host) and its shard index."""
    if shard_index is None:
        shard_index = jax.process_index()
    if shard_count is None:
        shard_count = jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    usable = len(ds) // shard_count * shard_count
    if usable == 0:
        raise ValueError(f"{len(ds)} records cannot be split over {shard_count} hosts")
    return ds[:usable][shard_index::shard_count], shard_index


def _host_seed(seed: int, shard_index: int) -> int:
    return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def _finish(
    ds: grain.MapDataset,
    *,
    batch_size: int,
    drop_remainder: bool,
    num_epochs: int | None,
    read_threads: int,
    prefetch_batches: int,
    worker_count: int,
    worker_buffer_size: int,
) -> grain.IterDataset:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if len(ds) == 0:
        raise ValueError(f"fewer records on this host than one batch of {batch_size}")
    ds = ds.repeat(num_epochs)
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


def _order(
    ds: grain.MapDataset,
    seed: int,
    shuffle: bool,
    shard_index: int | None,
    shard_count: int | None,
) -> grain.MapDataset:
    ds, host = _host_shard(ds, shard_index, shard_count)
    ds = ds.seed(_host_seed(seed, host))
    return ds.shuffle() if shuffle else ds


# ---------------------------------------------------------------------------------------
# Stage 1: VQGAN images


class _ImageExample(grain.transforms.RandomMap):
    """record -> {"image": float32 (S, S, 3) in [-1, 1]} (+ "mask": float32 (S, S) alpha in
    [0, 1] when with_mask), optionally mirrored, or a random (crop, crop) window of it."""

    def __init__(self, key: str, random_flip: bool, crop: int = 0, with_mask: bool = False):
        self.key, self.random_flip, self.crop, self.with_mask = key, random_flip, crop, with_mask

    def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict:
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
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_threads: int = 8,
    prefetch_batches: int = 8,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
) -> grain.IterDataset:
    """Stage-1 batches {"image": float32 (batch_size, S, S, 3) in [-1, 1]} (NHWC).

    target: "frames" (ground-truth VQGAN E/D) or "masked" (masked-frame encoder E_m).
    crop: train on random (crop, crop) windows instead of whole frames (0 = whole).
    with_mask: also yield "mask", float32 (batch_size, S, S) lower-face alpha in [0, 1]
    (for the mask-weighted L1), cropped and mirrored with the image.
    batch_size is per host. num_epochs=None repeats forever. shard_index/shard_count
    default to jax.process_index()/process_count().
    """
    key = {"frames": "frame", "masked": "masked_frame"}.get(target)
    if key is None:
        raise ValueError(f"target must be 'frames' or 'masked', got {target!r}")
    other = "masked_frame" if key == "frame" else "frame"
    # Undecoded bytes for what this stage never looks at: saves a JPEG decode per sample.
    skip = (other,) if with_mask else (other, "mask")
    source, _ = records_lib.open_dataset(data_dir, split, skip_decoding=skip)
    ds = _order(grain.MapDataset.source(source), seed, shuffle, shard_index, shard_count)
    ds = ds.random_map(_ImageExample(key, random_flip, crop, with_mask))
    return _finish(
        ds,
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


class _LatentExample(grain.transforms.RandomMap):
    """record position -> {latent, masked_latent, reference_latent, audio (, mask)} (see
    dit_dataset)."""

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        index: dict[str, np.ndarray],
        d: int,
        with_mask: bool = False,
    ):
        self.source, self.min_distance, self.with_mask = source, d, with_mask
        self.frame_index = index["frame_index"]
        self.start, self.length = index["start"], index["length"]
        self.video_of = np.repeat(np.arange(len(self.start)), self.length)

    def random_map(self, position: int, rng: np.random.Generator) -> dict:
        position = int(position)
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
        return example


def dit_dataset(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    min_reference_distance: int = 60,
    with_mask: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_threads: int = 8,
    prefetch_batches: int = 8,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
) -> grain.IterDataset:
    """Stage-2 batches, all float32, per host:

        latent            (batch_size, h, w, c)  pre-quantisation latent of the target frame
        masked_latent     (batch_size, h, w, c)  one of the K masked variants, at random
        reference_latent  (batch_size, h, w, c)  latent of a frame of the same video at least
                                                 min_reference_distance frames away
                                                 (`choose_reference`)
        audio             (batch_size, W, D)
        mask              (batch_size, h, w)     with_mask only: the target frame's lower-face
                                                 alpha in [0, 1] on the latent grid

    Arguments as in `vqgan_dataset`; pass `DataConfig.min_reference_distance`.
    """
    source, features = records_lib.open_dataset(data_dir, split)
    if with_mask and "mask" not in features:
        raise ValueError(
            f"{data_dir}: these latent records have no 'mask' (written before masks were "
            "stored); re-run data/encode_latents.py to use a mask-weighted loss"
        )
    index = records_lib.load_video_index(data_dir, split)
    if int(index["length"].sum()) != len(source):
        raise ValueError(f"{data_dir}: video index and split '{split}' disagree; re-finalize")
    # The index space is the source: the map reads the target and its reference itself.
    ds = grain.MapDataset.range(len(source))
    ds = _order(ds, seed, shuffle, shard_index, shard_count)
    ds = ds.random_map(_LatentExample(source, index, min_reference_distance, with_mask))
    return _finish(
        ds,
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
    host_batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
    """Assembles every host's (B_host, ...) arrays into global (B_host * hosts, ...) arrays.

    `sharding` splits the leading (batch) dimension over the mesh's data axes, e.g.
    `NamedSharding(mesh, P(("data", "fsdp")))`; each host passes only its own rows, which
    must be the rows its addressable devices hold (true for a contiguous process layout,
    the default for `jax.make_mesh`).
    """
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in host_batch.items()
    }
