"""Temporal smoothness of generated mouths, generated over real (1 = as smooth as the truth).

    flicker  mean |x[t+1] - x[t]| inside the lower-face mask: every frame-to-frame change,
             so it mixes real motion (a mouth opening fast) with jitter.
    jitter   RMS of the second difference x[t+1] - 2 x[t] + x[t-1] inside the mask: zero for
             motion at constant speed, large for a frame that jumps off its neighbours'
             line and back. Frame-by-frame diffusion leaves that kind of error (each frame
             its own noise draw); what video frame interpolation is meant to remove.

Both are ratios of the generated clip's value to the real clip's over the same frames and
mask weights, (T, S, S, 3) uint8 (or float) frames and (T, S, S) uint8 masks.
"""

from __future__ import annotations

import numpy as np


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    weight = mask[..., None].astype(np.float64) / 255
    return float((values * weight).sum() / max(weight.sum() * values.shape[-1], 1e-9))


def flicker(real: np.ndarray, fake: np.ndarray, mask: np.ndarray) -> float:
    """Frame-to-frame change inside the lower-face mask, generated over real (1 = as smooth
    as the real video, above 1 = flicker); nan for fewer than 2 frames."""
    if len(real) < 2:
        return float("nan")

    def change(frames: np.ndarray) -> float:
        return _masked_mean(np.abs(np.diff(frames.astype(np.float64), axis=0)), mask[1:])

    return change(fake) / max(change(real), 1e-9)


def jitter(real: np.ndarray, fake: np.ndarray, mask: np.ndarray) -> float:
    """RMS second temporal difference inside the mask, generated over real (1 = as steady
    as the real video); nan for fewer than 3 frames."""
    if len(real) < 3:
        return float("nan")

    def energy(frames: np.ndarray) -> float:
        second = np.diff(frames.astype(np.float64), n=2, axis=0)
        return float(np.sqrt(_masked_mean(second**2, mask[1:-1])))

    return energy(fake) / max(energy(real), 1e-9)
