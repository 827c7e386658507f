"""Stage-1 dataset -> stage-2 latent records (what the DiT trains on).

Per frame: E(frame) and E_m(masked frame) for K mask positions (variant 0 is the dataset's
own mask, the others shift it by a few pixels: the paper's augmentation, see
masks.mask_shifts), the dataset's lower-face mask area-averaged to the latent grid, plus the
audio window. Latents are stored normalised per channel,
(z - mean) / std, with mean and std estimated once from training frames and kept in the
dataset's provenance together with the VQGAN runs that made it; sampling undoes it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dithead_jax.config import DataConfig
from dithead_jax.data.masks import mask_shifts, shifted_masked_frames
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
    source, index: dict[str, np.ndarray], encoder: Encoder, frames: int, seed: int
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of E(frame) over up to `frames` random training records."""
    total = int(index["length"].sum())
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(frames, total), replace=False))
    latents = []
    for chunk in np.array_split(picks, max(1, len(picks) // 64)):
        latents.append(encoder(np.stack([source[int(i)]["frame"] for i in chunk])))
    z = np.concatenate(latents).reshape(-1, latents[0].shape[-1]).astype(np.float64)
    return z.mean(0).tolist(), np.maximum(z.std(0), 1e-6).tolist()


def encode_dataset(
    job: LatentJob, encode_frames: Encoder, encode_masked: Encoder, progress: bool = True
) -> Path:
    """Writes (or resumes) the stage-2 dataset of `job`; returns its dataset directory."""
    meta = dataset_metadata(job.stage1)
    size, window, dim = meta["image_size"], meta["audio_window"], meta["audio_dim"]
    data = DataConfig(image_size=size, audio_window=window, audio_dim=dim)
    train_source, _ = open_dataset(job.stage1, "train")
    train_index = load_video_index(job.stage1, "train")
    existing = job.out / "writer.json"
    if existing.exists():  # resume: the statistics were fixed by the first run
        import json

        provenance = json.loads(existing.read_text())["provenance"]
    else:
        mean, std = latent_statistics(
            train_source, train_index, encode_frames, job.stats_frames, job.seed
        )
        provenance = {
            "stage1_dataset": os.fspath(Path(job.stage1).resolve()),
            "vqgan_workdir": os.fspath(Path(job.vqgan_workdir).resolve()),
            "vqgan_masked_workdir": os.fspath(Path(job.vqgan_masked_workdir).resolve()),
            "latent_mean": mean,
            "latent_std": std,
            "mask_shifts": mask_shifts(
                job.num_masked, job.max_shift_at_256 * size / 256, job.seed
            ).tolist(),
            "image_size": size,
        }
    mean = np.asarray(provenance["latent_mean"], np.float32)
    std = np.asarray(provenance["latent_std"], np.float32)
    shifts = np.asarray(provenance["mask_shifts"], np.float32)
    probe = encode_frames(np.zeros((1, size, size, 3), np.uint8))
    writer = DatasetWriter(
        job.out,
        "stage2",
        latent_shape=probe.shape[1:],
        num_masked=len(shifts),
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
            masked = np.stack(
                [shifted_masked_frames(r["frame"], r["landmarks"], shifts, data) for r in records]
            )  # (T, K, S, S, 3)
            latent = (encode_frames(frames) - mean) / std
            masked_latents = (encode_masked(masked.reshape(-1, size, size, 3)) - mean) / std
            writer.write_video(
                split,
                video_id,
                {
                    "latent": latent,
                    "masked_latents": masked_latents.reshape(
                        len(records), len(shifts), *latent.shape[1:]
                    ),  # noqa: E501
                    "mask": latent_mask(np.stack([r["mask"] for r in records]), latent.shape[1]),
                    "audio": np.stack([r["audio"] for r in records]),
                    "frame_index": np.array([r["frame_index"] for r in records]),
                },
                identity=str(identity),
            )
    return writer.finalize()


def make_encoder(vqgan: Any, batch_size: int = 32) -> Encoder:
    """A jitted E: uint8 frames -> float32 latents, data-parallel over all local devices.

    Batches are padded to a multiple of the device count so every call has one shape
    (one compile), and the padding is dropped from the result.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dithead_jax.sharding import make_mesh

    devices = jax.local_devices()
    mesh = make_mesh("dp", devices)  # Auto axis types: the model code stays sharding-agnostic
    batch_size = -(-batch_size // len(devices)) * len(devices)
    graphdef, state = nnx.split(vqgan)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)

    @jax.jit
    def run(state, frames):
        images = frames.astype(jnp.float32) / 127.5 - 1.0
        return nnx.merge(graphdef, state).encode(images)

    data_sharding = NamedSharding(mesh, P("data"))

    def encode(frames: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(frames), batch_size):
            chunk = frames[start : start + batch_size]
            padded = np.zeros((batch_size, *chunk.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            out.append(np.asarray(run(state, jax.device_put(padded, data_sharding)))[: len(chunk)])
        return np.concatenate(out)

    return encode
