"""Small record sets for training tests: stage-1 clips of given frames, and random stage-2
records (random arrays stand in for VQGAN latents)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # when run as a script

from dithead_jax.data import records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def dit_testing_config(data_dir: str | Path):
    """configs/dit.py:testing (an ml_collections ConfigDict) reading `data_dir`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dit_config", ROOT / "configs" / "dit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("testing")
    config.data.dir = str(data_dir)
    return config


def write_stage1_clip(
    out_dir: str | Path,
    frames: np.ndarray,
    mask: np.ndarray,
    *,
    masked_frames: np.ndarray | None = None,
    name: str = "clip0",
) -> Path:
    """One finalized stage-1 clip: (T, S, S, 3) uint8 `frames`, (T, S, S) uint8 `mask`;
    the masked frames default to the frames (a frames-VQGAN run never reads them)."""
    t, size = len(frames), frames.shape[1]
    writer = records.DatasetWriter(
        out_dir, "stage1", image_size=size, audio_window=11, audio_dim=33, image_encoding="png"
    )
    writer.write_video(
        "train",
        name,
        {
            "frame": frames,
            "masked_frame": frames if masked_frames is None else masked_frames,
            "mask": mask,
            "landmarks": np.zeros((t, 68, 2), np.float32),
            "crop_box": np.zeros((t, 4), np.float32),
            "source_size": np.full((t, 2), size, np.int32),
            "audio": np.zeros((t, 11, 33), np.float32),
        },
        identity="id0",
    )
    return Path(writer.finalize())


def write_random_stage2(
    out_dir: str | Path,
    *,
    videos: int = 2,
    frames: int = 24,
    latent_shape: tuple[int, int, int] = (16, 16, 3),
    num_masked: int = 2,
    audio_window: int = 11,
    audio_dim: int = 33,
    seed: int = 0,
) -> Path:
    """Writes and finalizes `videos` videos of `frames` random frames; returns `out_dir`.

    The masked latent is the target latent with its lower half zeroed, so it is a plausible
    function of the target; the audio is random.
    """
    writer = records.DatasetWriter(
        out_dir,
        "stage2",
        latent_shape=latent_shape,
        num_masked=num_masked,
        audio_window=audio_window,
        audio_dim=audio_dim,
    )
    rng = np.random.default_rng(seed)
    h = latent_shape[0]
    for v in range(videos):
        latent = rng.normal(size=(frames, *latent_shape)).astype(np.float32)
        masked = np.repeat(latent[:, None], num_masked, axis=1)
        masked[:, :, h // 2 :] = 0.0
        writer.write_video(
            "train",
            f"video{v:03d}",
            {
                "latent": latent.astype(np.float16),
                "masked_latents": masked.astype(np.float16),
                # The lower half, where `masked` hides the target: the mask-weighted loss's
                # region.
                "mask": np.broadcast_to(
                    (np.arange(h) >= h // 2)[:, None] * np.uint8(255), (frames, h, latent_shape[1])
                ),
                "audio": rng.normal(size=(frames, audio_window, audio_dim)).astype(np.float32),
            },
            identity=f"id{v % 2}",
        )
    writer.finalize()
    return Path(out_dir)


if __name__ == "__main__":
    # Random records for a CPU demo of train.py (configs/dit.py:testing wants 16x16x3):
    #   python tests/stage2_data.py /tmp/latents
    print(write_random_stage2(sys.argv[1], videos=4, frames=32))
