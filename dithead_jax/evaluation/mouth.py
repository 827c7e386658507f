"""The synthetic mouth-sync score: how far the generated mouths follow the speech.

Where ground truth exists (our synthetic talking faces), lip sync is scored directly: the
correlation between the mouth opening *measured in generated frames* and the true opening
the speech dictated, next to the same correlation for a shuffled-audio control.

The measurement is a small expert, like SyncNet for real video: a ridge regression from the
pixels of a mouth region to the opening, fitted on ground-truth frames of the *training*
identities and checked on held-out ones (`MouthExpert.fit`, `calibration`). The region is
placed by landmarks that do not move with the mouth (nose base 33, face width 0-16), so it
cannot leak the true opening into the measurement, and its pixels are divided by the cheek
colour, so skin tone and lighting matter less than shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

ROI_PIXELS = 16


def mouth_features(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(ROI_PIXELS^2 * 3 + 1,) features of frame (S, S, 3) uint8 with landmarks (68, 2)."""
    face_width = float(np.linalg.norm(landmarks[16] - landmarks[0]))
    cx, nose_y = landmarks[33]
    box = (
        cx - 0.22 * face_width,
        nose_y + 0.02 * face_width,
        cx + 0.22 * face_width,
        nose_y + 0.46 * face_width,
    )
    # Landmarks put pixel centres at integers; PIL's EXTENT box uses pixel edges.
    box = tuple(float(v) + 0.5 for v in box)
    roi = Image.fromarray(frame).transform(
        (ROI_PIXELS, ROI_PIXELS), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR
    )
    size = frame.shape[0]
    cheek = (landmarks[[36, 45]] + landmarks[[48, 54]]) / 2
    idx = np.clip(np.round(cheek).astype(int), 0, size - 1)
    skin = frame[idx[:, 1], idx[:, 0]].astype(np.float32).mean(0)
    pixels = np.asarray(roi, np.float32) / (skin + 8.0)
    return np.concatenate([pixels.ravel(), [1.0]]).astype(np.float32)


def features_of(frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    return np.stack([mouth_features(f, lm) for f, lm in zip(frames, landmarks, strict=True)])


@dataclasses.dataclass(frozen=True)
class MouthExpert:
    """Ridge regression: mouth features -> inner-lip opening (synthetic `mouth_open` units)."""

    weights: np.ndarray  # (F,)

    @staticmethod
    def fit(
        frames: np.ndarray, landmarks: np.ndarray, openings: np.ndarray, ridge: float = 1.0
    ) -> MouthExpert:
        x = features_of(frames, landmarks).astype(np.float64)
        gram = x.T @ x + ridge * np.eye(x.shape[1])
        return MouthExpert(np.linalg.solve(gram, x.T @ openings).astype(np.float32))

    def predict(self, frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return features_of(frames, landmarks) @ self.weights

    def save(self, path: str | Path) -> None:
        np.savez(path, weights=self.weights, roi_pixels=ROI_PIXELS)

    @staticmethod
    def load(path: str | Path) -> MouthExpert:
        data = np.load(path)
        if int(data["roi_pixels"]) != ROI_PIXELS:
            raise ValueError(f"{path}: made for {int(data['roi_pixels'])}px regions")
        return MouthExpert(data["weights"])


def sync_correlation(measured: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (no information, no sync)."""
    measured, truth = np.asarray(measured, np.float64), np.asarray(truth, np.float64)
    if np.std(measured) < 1e-9 or np.std(truth) < 1e-9:
        return 0.0
    return float(np.corrcoef(measured, truth)[0, 1])
