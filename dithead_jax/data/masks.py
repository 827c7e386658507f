"""The lower-face mask of DiT-Head: convex hull over jaw and nose base, Gaussian alpha edge.

DESIGN.md's decision: the hull of jaw points 1-15 and nose-bottom point 33 (0-based iBUG),
so the mask outline follows the jaw and never the lips (a lip-shaped outline would leak the
answer into the masked frame). The binary hull is dilated by two sigmas before blurring, so
alpha is 1 over the whole hull and the soft edge lies outside it: nothing of the mouth
shows through, and paste-back blends over the skin around the jaw.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage.draw import polygon2mask

from dithead_jax.config import DataConfig

REFERENCE_SIZE = 256  # the paper's 27x27 kernel with sigma 5 is for 256-pixel crops


def gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    """(size,) float64 normalised Gaussian taps centred on the middle one (the mask blur's
    kernel and, with size 2 * int(3.5 sigma + 0.5) + 1, SSIM's scipy-style window)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_params(image_size: int, cfg: DataConfig) -> tuple[int, float]:
    """Kernel size (odd) and sigma scaled from the 256-pixel setting to `image_size`."""
    scale = image_size / REFERENCE_SIZE
    size = max(3, int(round(cfg.mask_blur_kernel * scale)) | 1)
    return size, cfg.mask_blur_sigma * scale


def lower_face_mask(
    landmarks: np.ndarray, image_size: int, cfg: DataConfig, shift: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """Alpha mask (image_size, image_size) float32 in [0, 1]; 1 = hidden lower face.

    landmarks: (68, 2) (x, y) in crop pixels. shift: (dx, dy) pixels applied to the hull
    (the paper's training augmentation moves mask and landmarks by a few pixels).
    """
    points = np.asarray(landmarks, np.float64)[list(cfg.mask_hull)] + np.asarray(shift)
    if not np.all(np.isfinite(points)):
        raise ValueError("landmarks contain non-finite values")
    hull = points[ConvexHull(points).vertices]
    inside = polygon2mask((image_size, image_size), hull[:, ::-1])
    size, sigma = blur_params(image_size, cfg)
    grown = ndimage.binary_dilation(inside, iterations=max(1, int(round(2 * sigma))))
    kernel = gaussian_kernel_1d(size, sigma).astype(np.float32)
    alpha = ndimage.convolve1d(grown.astype(np.float32), kernel, axis=0, mode="constant")
    alpha = ndimage.convolve1d(alpha, kernel, axis=1, mode="constant")
    # Dilating by 2 sigma leaves the hull itself at alpha >= 0.97; make it exactly 1.
    return np.clip(np.maximum(alpha, inside), 0.0, 1.0).astype(np.float32)


def apply_mask(frame: np.ndarray, alpha: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Masked frame: frame * (1 - alpha) + fill * alpha. frame (H, W, 3) uint8, fill in [0, 1]."""
    out = frame.astype(np.float32) * (1 - alpha[..., None]) + 255.0 * fill * alpha[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def loss_weights(alpha, weight: float):
    """Per-pixel loss weights 1 + weight * alpha, (..., h, w) -> (..., h, w, 1), scaled to
    mean 1 over the batch so the loss keeps its scale and the learning rate its meaning.
    Works on numpy and jax arrays alike (the VQGAN's L1 and the DiT's MSE both use it)."""
    weights = 1.0 + weight * alpha[..., None]
    return weights / weights.mean()


def mask_shifts(
    num_variants: int, max_shift: float, seed: int = 0, key: Sequence[int] = ()
) -> np.ndarray:
    """(K, 2) pixel shifts (dx, dy), uniform in [-max_shift, max_shift]^2; variant 0 is
    always unshifted (sampling and evaluation mask with the dataset's own mask).

    `key` names what the draw belongs to (`frame_key` of one frame): the shifts are a pure
    function of (seed, key), so a re-run or resumed encode draws the same ones, and every
    frame gets its own continuous draws -- no offset repeats across the dataset. The paper
    moves the mask at random per training sample; `data/latents.py` says why we realise that
    as K precomputed variants per frame instead of encoding on the fly.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), *(int(k) for k in key)]))
    shifts = rng.uniform(-max_shift, max_shift, (num_variants, 2))
    shifts[0] = 0.0
    return shifts.astype(np.float32)


def frame_key(video_id: str, frame_index: int) -> tuple[int, int]:
    """A frame's identity for `mask_shifts`: (crc32 of its video id, its source frame index).
    Unlike a record position it survives re-finalizing the dataset with more videos."""
    return zlib.crc32(video_id.encode()), int(frame_index)


def shifted_masked_frames(
    frame: np.ndarray, landmarks: np.ndarray, shifts: np.ndarray, cfg: DataConfig
) -> np.ndarray:
    """(K, S, S, 3) uint8: the frame masked with the lower-face mask moved by each shift."""
    size = frame.shape[0]
    return np.stack(
        [
            apply_mask(frame, lower_face_mask(landmarks, size, cfg, tuple(s)), cfg.mask_fill)
            for s in shifts
        ]
    )
