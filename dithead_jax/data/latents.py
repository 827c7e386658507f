"""Stage-1 dataset -> stage-2 latent records (what the DiT trains on).

Per frame: E(frame); E_m(masked frame) for K mask positions; the dataset's lower-face mask
area-averaged to the latent grid; the audio window; the K mask shifts; and DiffTalk's
landmarks (`config.CONDITION_LANDMARKS`, crop coordinates / image size) for the optional
landmark condition. Latents are stored normalised per channel, (z - mean) / std: E's
latents with E's statistics, E_m's with E_m's own (both estimated once from training
frames, E_m's on the unshifted masked frames, and kept in the dataset's provenance with the
VQGAN runs that made it; sampling encodes a masked frame with E_m and normalises it with
`masked_statistics`). Datasets written before E_m had its own statistics used E's for both;
`masked_statistics` falls back to those, which is what their latents were made with.

The paper's random mask shift. Variant 0 is the dataset's own mask (sampling and evaluation
mask with it); variants 1..K-1 move it by offsets drawn uniformly in +-max_shift pixels
(4 at 256^2, scaled with the crop) per (frame, variant), seeded by (seed, crc32(video id),
frame index): a re-run or resume draws the same offsets, no offset repeats across the
dataset, and every record stores its own (`mask_shifts`, (K, 2)). The pipeline picks one
variant per sample. The loss's mask weight stays the unshifted dataset mask: it marks
where the target's mouth is, which a shifted conditioning mask does not move.

Why K precomputed variants and not E_m on the fly in the DiT step (bench/mask_shift.py,
2026-12, this 2-core CPU): E_m (vq-f4 encoder, configs default) on one 256^2 frame is
342 GFLOP (XLA cost analysis; its 64x64 mid-block attention is much of it), a DiT-L/2 train
step on one 64x64x3 example 2,482 GFLOP, so on the fly adds ~14% compute to every step of
every epoch, plus E_m's weights and activations in the step and stage-1 pixels (JPEG
decode + a ~8 ms mask) in the input pipeline. Each precomputed variant costs one E_m
forward per frame once (9.1 s per frame on this CPU; a TPU/GPU does it in milliseconds),
~8 ms of CPU for its mask, and 22 KiB per frame on disk (zstd, float16). K variants cost
less than encoding on the fly as soon as training runs more than K-1 epochs, which a
DiT-L/2 run does many times over; what is given up is that a frame reuses its K offsets
from epoch to epoch (distinct across frames). More variants (--mask-variants) buy more.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dithead_jax.config import CONDITION_LANDMARKS, DataConfig
from dithead_jax.data.masks import frame_key, mask_shifts, shifted_masked_frames
from dithead_jax.data.records import (
    DatasetWriter,
    dataset_metadata,
    load_video_index,
    open_dataset,
)

Encoder = Callable[[np.ndarray], np.ndarray]  # uint8 (N, S, S, 3) -> float (N, h, w, c)


@dataclasses.dataclass(frozen=True)
class LatentJob:
    stage1: Path  # stage-1 dataset (writer out_dir or its dataset/)
    out: Path
    vqgan_workdir: str
    vqgan_masked_workdir: str
    num_masked: int = 4
    max_shift_at_256: float = 4.0  # pixels; scaled with the crop size
    stats_frames: int = 1024
    seed: int = 0


def _records(source, start: int, length: int) -> list[dict[str, Any]]:
    return [source[i] for i in range(start, start + length)]


def latent_mask(masks: np.ndarray, size: int) -> np.ndarray:
    """uint8 alpha masks (T, S, S) -> uint8 (T, size, size), each cell the mean over its
    (S / size)^2 pixels: how much of that latent position the lower-face mask covers."""
    t, s = masks.shape[0], masks.shape[1]
    if s % size:
        raise ValueError(f"mask size {s} is not a multiple of the latent size {size}")
    f = s // size
    cells = masks.astype(np.float32).reshape(t, size, f, size, f).mean(axis=(2, 4))
    return np.round(cells).astype(np.uint8)


def latent_statistics(
    source,
    index: dict[str, np.ndarray],
    encoder: Encoder,
    frames: int,
    seed: int,
    image: Callable[[dict[str, Any]], np.ndarray] = lambda record: record["frame"],
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of encoder(image(record)) over up to `frames` random
    training records (the same records for every call with one seed)."""
    total = int(index["length"].sum())
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(frames, total), replace=False))
    latents = []
    for chunk in np.array_split(picks, max(1, len(picks) // 64)):
        latents.append(encoder(np.stack([image(source[int(i)]) for i in chunk])))
    z = np.concatenate(latents).reshape(-1, latents[0].shape[-1]).astype(np.float64)
    return z.mean(0).tolist(), np.maximum(z.std(0), 1e-6).tolist()


def masked_statistics(provenance: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) that normalise E_m's latents of this dataset, float32 (c,).

    Datasets written before E_m had its own statistics normalised masked latents with E's,
    so for them E's statistics are the right ones, not an approximation."""
    mean = provenance.get("masked_latent_mean", provenance["latent_mean"])
    std = provenance.get("masked_latent_std", provenance["latent_std"])
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def condition_landmarks(landmarks: np.ndarray, image_size: int) -> np.ndarray:
    """(..., 68, 2) crop pixels -> (..., n, 2) float32: DiffTalk's points in [0, 1] crop
    coordinates (`config.CONDITION_LANDMARKS`)."""
    points = np.asarray(landmarks, np.float32)[..., list(CONDITION_LANDMARKS), :]
    return points / np.float32(image_size)


def frame_shifts(
    video_id: str, frame_index: np.ndarray, num_masked: int, max_shift: float, seed: int
) -> np.ndarray:
    """(T, K, 2) float32 mask shifts of a video's frames (masks.mask_shifts per frame)."""
    return np.stack(
        [mask_shifts(num_masked, max_shift, seed, frame_key(video_id, int(i))) for i in frame_index]
    )


def _new_provenance(job: LatentJob, size: int, encode_frames: Encoder, encode_masked: Encoder):
    train_source, _ = open_dataset(job.stage1, "train")
    train_index = load_video_index(job.stage1, "train")
    data = DataConfig(image_size=size)
    mean, std = latent_statistics(
        train_source, train_index, encode_frames, job.stats_frames, job.seed
    )
    # E_m sees what it encodes for training and sampling: the frame under the unshifted
    # mask (variant 0), on the same training records as E's statistics.
    unshifted = np.zeros((1, 2), np.float32)
    m_mean, m_std = latent_statistics(
        train_source,
        train_index,
        encode_masked,
        job.stats_frames,
        job.seed,
        lambda r: shifted_masked_frames(r["frame"], r["landmarks"], unshifted, data)[0],
    )
    # Relative to the folder holding this dataset's metadata.json (`out/dataset`), so the
    # runs and datasets moved together still find each other (runs.resolve_recorded).
    from dithead_jax.runs import relative_to

    base = Path(job.out) / "dataset"
    return {
        "stage1_dataset": relative_to(job.stage1, base),
        "vqgan_workdir": relative_to(job.vqgan_workdir, base),
        "vqgan_masked_workdir": relative_to(job.vqgan_masked_workdir, base),
        "latent_mean": mean,
        "latent_std": std,
        "masked_latent_mean": m_mean,
        "masked_latent_std": m_std,
        # Per-frame shifts: masks.mask_shifts(num_masked, max, seed, frame_key(video, frame)).
        "mask_shift_max": job.max_shift_at_256 * size / 256,
        "mask_shift_seed": job.seed,
        "condition_landmarks": list(CONDITION_LANDMARKS),
        "image_size": size,
    }


def encode_dataset(
    job: LatentJob, encode_frames: Encoder, encode_masked: Encoder, progress: bool = True
) -> Path:
    """Writes (or resumes) the stage-2 dataset of `job`; returns its dataset directory."""
    meta = dataset_metadata(job.stage1)
    size, window, dim = meta["image_size"], meta["audio_window"], meta["audio_dim"]
    data = DataConfig(image_size=size, audio_window=window, audio_dim=dim)
    existing = job.out / "writer.json"
    if existing.exists():  # resume: the statistics were fixed by the first run
        provenance = json.loads(existing.read_text())["provenance"]
        if "mask_shift_max" not in provenance:
            raise ValueError(
                f"{job.out}: written by an older encode_latents.py (dataset-wide mask "
                "shifts); it cannot be resumed with per-frame shifts: pass a new --out"
            )
    else:
        provenance = _new_provenance(job, size, encode_frames, encode_masked)
    mean = np.asarray(provenance["latent_mean"], np.float32)
    std = np.asarray(provenance["latent_std"], np.float32)
    m_mean, m_std = masked_statistics(provenance)
    max_shift, shift_seed = float(provenance["mask_shift_max"]), int(provenance["mask_shift_seed"])
    probe = encode_frames(np.zeros((1, size, size, 3), np.uint8))
    writer = DatasetWriter(
        job.out,
        "stage2",
        latent_shape=probe.shape[1:],
        num_masked=job.num_masked,
        mask_shifts=True,
        num_landmarks=len(CONDITION_LANDMARKS),
        audio_window=window,
        audio_dim=dim,
        provenance=provenance,
    )
    for split in ("train", "test"):
        try:
            source, _ = open_dataset(job.stage1, split)
            index = load_video_index(job.stage1, split)
        except (FileNotFoundError, KeyError, ValueError):
            continue  # a dataset without a test split
        videos = list(
            zip(index["video_id"], index["identity"], index["start"], index["length"], strict=True)
        )  # noqa: E501
        for video_id, identity, start, length in tqdm(
            videos, desc=f"latents ({split})", unit="video", disable=not progress
        ):
            video_id = str(video_id)
            if writer.has_video(video_id):
                continue
            records = _records(source, int(start), int(length))
            frames = np.stack([r["frame"] for r in records])
            frame_index = np.array([r["frame_index"] for r in records])
            shifts = frame_shifts(video_id, frame_index, job.num_masked, max_shift, shift_seed)
            masked = np.stack(
                [
                    shifted_masked_frames(r["frame"], r["landmarks"], s, data)
                    for r, s in zip(records, shifts, strict=True)
                ]
            )  # (T, K, S, S, 3)
            latent = (encode_frames(frames) - mean) / std
            masked_latents = (encode_masked(masked.reshape(-1, size, size, 3)) - m_mean) / m_std
            landmarks = np.stack([r["landmarks"] for r in records])
            writer.write_video(
                split,
                video_id,
                {
                    "latent": latent,
                    "masked_latents": masked_latents.reshape(
                        len(records), job.num_masked, *latent.shape[1:]
                    ),
                    "mask": latent_mask(np.stack([r["mask"] for r in records]), latent.shape[1]),
                    "audio": np.stack([r["audio"] for r in records]),
                    "frame_index": frame_index,
                    "mask_shifts": shifts,
                    "landmarks": condition_landmarks(landmarks, size),
                },
                identity=str(identity),
            )
    return writer.finalize()


def make_encoder(vqgan: Any, batch_size: int = 32) -> Encoder:
    """A jitted E: uint8 frames (N, S, S, 3) -> float32 latents, data-parallel over all
    local devices (`data_parallel_batches`)."""
    import jax.numpy as jnp

    def encode(model, frames):
        return model.encode(frames.astype(jnp.float32) / 127.5 - 1.0)

    return data_parallel_batches(vqgan, encode, batch_size)


def make_decoder(vqgan: Any, batch_size: int = 32) -> Encoder:
    """A jitted D: latents (N, h, w, c) -> uint8 frames (N, S, S, 3), D quantising first;
    data-parallel over all local devices like `make_encoder`."""
    import jax.numpy as jnp

    def decode(model, latents):
        images = model.decode(latents)
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return data_parallel_batches(vqgan, decode, batch_size)


def data_parallel_batches(module: Any, fn: Any, batch_size: int) -> Encoder:
    """`fn(module, batch)` jitted, run over an array's leading axis in fixed-size batches
    split over all local devices; returns host arrays.

    Full batches are `batch_size` (rounded up to a multiple of the device count); a shorter
    one (a short clip, a chunk's end) is padded with zeros only to the next power of two
    (a multiple of the device count), so at most log2(batch_size) programs compile and a
    16-frame chunk does not pay for 64 (at 64^2 crops, padding every call to 64 made D's
    decode cost the same for 16 frames as for 64: most of a 16-frame chunk's generation).
    Memory stays bounded whatever the input length; the padding is dropped from the result.
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dithead_jax.sharding import make_mesh

    devices = jax.local_devices()
    ndev = len(devices)
    mesh = make_mesh("dp", devices)  # Auto axis types: the model code stays sharding-agnostic
    batch_size = -(-batch_size // len(devices)) * len(devices)
    graphdef, state = nnx.split(module)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    run = jax.jit(lambda state, batch: fn(nnx.merge(graphdef, state), batch))
    data_sharding = NamedSharding(mesh, P("data"))

    def apply(inputs: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(inputs), batch_size):
            chunk = np.asarray(inputs[start : start + batch_size])
            bucket = min(batch_size, -(-(1 << (len(chunk) - 1).bit_length()) // ndev) * ndev)
            padded = np.zeros((bucket, *chunk.shape[1:]), chunk.dtype)
            padded[: len(chunk)] = chunk
            out.append(np.asarray(run(state, jax.device_put(padded, data_sharding)))[: len(chunk)])
        return np.concatenate(out)

    return apply
