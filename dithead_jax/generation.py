"""Pieces of video generation that are not the sampler: length matching and paste-back.

Audio longer than the video loops the video back and forth (ping-pong: no jump cut at the
loop point); shorter audio trims the video to the audio's frames.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def pingpong_indices(num_source: int, num_target: int) -> np.ndarray:
    """Frame indices 0, 1, .., n-1, n-2, .., 1, 0, 1, .. of length num_target."""
    if num_source < 1:
        raise ValueError("no source frames")
    if num_source == 1:
        return np.zeros(num_target, np.int64)
    period = 2 * (num_source - 1)
    phase = np.arange(num_target) % period
    return np.where(phase < num_source, phase, period - phase).astype(np.int64)


def frames_for_audio(num_video_frames: int, audio_samples: int, sample_rate: int, fps: int) -> int:
    """How many output frames the driving audio lasts (rounded down to whole frames)."""
    return max(1, audio_samples * fps // sample_rate) if num_video_frames else 0


def paste_back(
    source: np.ndarray, face: np.ndarray, crop_box: np.ndarray, alpha: np.ndarray
) -> np.ndarray:
    """Blends a generated face crop back into its source frame.

    source (H, W, 3) uint8; face (S, S, 3) uint8 generated in the crop `crop_box` (x0, y0, x1,
    y1 in PIL pixel-edge coordinates, as faces.crop_face takes it); alpha (S, S) in [0, 1]:
    where the face replaces the source (the soft lower-face mask), so everything outside the
    mask stays exactly the source video.
    """
    height, width = source.shape[:2]
    size = face.shape[0]
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    # Destination pixels the box touches, clipped to the frame.
    left, top = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    right, bottom = min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1)))
    if right <= left or bottom <= top:
        return source.copy()
    scale_x, scale_y = size / (x1 - x0), size / (y1 - y0)
    # The crop-space extent of that destination rectangle (pixel edges on both sides).
    extent = (
        (left - x0) * scale_x,
        (top - y0) * scale_y,
        (right - x0) * scale_x,
        (bottom - y0) * scale_y,
    )
    out_size = (right - left, bottom - top)
    warped_face = Image.fromarray(face).transform(
        out_size, Image.Transform.EXTENT, extent, Image.Resampling.BICUBIC
    )
    alpha_img = Image.fromarray(np.asarray(alpha, np.float32), mode="F")
    warped_alpha = alpha_img.transform(
        out_size, Image.Transform.EXTENT, extent, Image.Resampling.BILINEAR
    )
    a = np.clip(np.asarray(warped_alpha, np.float32), 0, 1)[..., None]
    out = source.copy()
    region = out[top:bottom, left:right].astype(np.float32)
    blended = region * (1 - a) + np.asarray(warped_face, np.float32) * a
    out[top:bottom, left:right] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def paste_chunk(
    sources: list[np.ndarray],
    faces: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    side_by_side: bool = False,
) -> np.ndarray:
    """`paste_back` over a chunk: sources (H, W, 3) uint8 each, faces (C, S, S, 3), boxes
    (C, 4), masks (C, S, S) uint8 alpha -> (C, H, W, 3), or (C, H, 2W, 3) source | dubbed."""
    out = []
    for source, face, box, mask in zip(sources, faces, boxes, masks, strict=True):
        frame = paste_back(source, face, box, mask.astype(np.float32) / 255)
        out.append(np.concatenate([source, frame], 1) if side_by_side else frame)
    return np.stack(out)


def even_frames(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) without an odd last row / column: H.264 4:2:0 needs even sizes."""
    return frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
