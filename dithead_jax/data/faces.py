"""Face landmarks (68-point iBUG) per frame, smoothed square crop boxes, crop + resize.

Landmark sources, all returning (68, 2) (x, y) pixels with pixel centres at integers, or
None where no face is found:
  * `face_alignment` - S3FD detector + FAN, the paper's choice. Its weights download on
    first use (needs internet once; cached under ~/.cache/torch afterwards).
  * `dlib` - HOG detector + the 68-point shape predictor, fully offline given the predictor
    file (Debian's libdlib-data, or the `face_recognition_models` package).
  * `sidecar` - an `.npz` next to the video with `landmarks` (T, 68, 2), as written by
    data/synthetic.py (exact landmarks, no detector).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

LandmarkFn = Callable[[np.ndarray], np.ndarray | None]

DLIB_PREDICTOR_NAME = "shape_predictor_68_face_landmarks.dat"


class NoFaceError(RuntimeError):
    pass


def sidecar_landmarks(video_path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """Landmarks from `<video>.npz`; (num_frames, 68, 2) float32. NaN rows = no face."""
    path = Path(video_path).with_suffix(".npz")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sidecar landmarks not found")
    landmarks = np.load(path)["landmarks"].astype(np.float32)
    if landmarks.shape[1:] != (68, 2):
        raise ValueError(f"{path}: landmarks must be (T, 68, 2), got {landmarks.shape}")
    if len(landmarks) < num_frames - 1 or len(landmarks) > num_frames + 1:
        raise ValueError(f"{path}: {len(landmarks)} landmark frames for {num_frames} video frames")
    if len(landmarks) < num_frames:  # one frame of rounding at the end of a stream
        landmarks = np.concatenate([landmarks, landmarks[-1:]])
    return landmarks[:num_frames]


def find_dlib_predictor() -> Path:
    """The 68-point predictor: $DLIB_SHAPE_PREDICTOR, Debian's libdlib-data, or the
    face_recognition_models package (imported by path: its pkg_resources import breaks
    with setuptools >= 81)."""
    candidates = [os.environ.get("DLIB_SHAPE_PREDICTOR", "")]
    candidates.append(f"/usr/share/dlib/{DLIB_PREDICTOR_NAME}")
    try:
        import importlib.util

        spec = importlib.util.find_spec("face_recognition_models")
        if spec and spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0])
            candidates.append(str(root / "models" / DLIB_PREDICTOR_NAME))
    except (ImportError, ValueError):
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"dlib 68-point predictor not found (set DLIB_SHAPE_PREDICTOR, install Debian's "
        f"libdlib-data or pip face_recognition_models); looked in {candidates[1:]}"
    )


def dlib_landmarker() -> LandmarkFn:
    import dlib

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(find_dlib_predictor()))

    def landmarks(frame: np.ndarray) -> np.ndarray | None:
        # The HOG detector finds faces from ~80 px; upsample small frames more before giving up.
        faces = detector(frame, 1) or detector(frame, 2)
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = predictor(frame, face)
        return np.array([[p.x, p.y] for p in shape.parts()], np.float32)

    return landmarks


def face_alignment_landmarker(
    device: str | None = None, filter_threshold: float = 0.5
) -> LandmarkFn:
    """S3FD + 2D-FAN-4 through the face-alignment package (weights from torch hub's cache,
    downloaded there on first use). torch.compile only on accelerators: on CPU its warm-up
    costs more than it saves on a few thousand frames. `filter_threshold`: S3FD's minimum
    detection score (the package's default 0.5)."""
    try:
        import face_alignment
        import torch
    except ImportError as e:
        raise ImportError("--landmarks face_alignment needs `pip install face-alignment`") from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D,
            device=device,
            face_detector="sfd",
            face_detector_kwargs={"filter_threshold": filter_threshold},
            compile=device != "cpu",
        )
    except Exception as e:  # the package raises bare URLError/HTTPError etc. when offline
        raise RuntimeError(
            f"face_alignment could not load its S3FD/FAN weights (downloaded into "
            f"{torch.hub.get_dir()}/checkpoints on first use): {e}"
        ) from e

    def landmarks(frame: np.ndarray) -> np.ndarray | None:
        found = model.get_landmarks_from_image(frame)
        if not found:
            return None
        # Largest face: the one whose landmark box is biggest.
        points = max(found, key=lambda p: np.ptp(p[:, 0]) * np.ptp(p[:, 1]))
        return np.asarray(points[:, :2], np.float32)

    return landmarks


def make_landmarker(kind: str) -> LandmarkFn:
    if kind == "dlib":
        return dlib_landmarker()
    if kind == "face_alignment":
        return face_alignment_landmarker()
    raise ValueError(f"unknown landmark source {kind!r}")


def face_boxes(
    landmarks: np.ndarray, margin: float = 0.35, smooth_frames: float = 3.0
) -> np.ndarray:
    """Square crop boxes (T, 4) = x0, y0, x1, y1 around each frame's landmarks.

    The box is centred a little above the landmarks' centre (landmarks stop at the brows;
    the crop should hold the forehead too) with side (1 + 2 * margin) * max(w, h). Centre
    and side are smoothed with a Gaussian over time (sigma `smooth_frames`) so the crop
    does not jitter with detector noise. Frames without a face (NaN) take interpolated boxes.
    """
    valid = np.all(np.isfinite(landmarks), axis=(1, 2))
    if not valid.any():
        raise NoFaceError("no face in any frame")
    lo = np.full((len(landmarks), 2), np.nan)
    hi = np.full((len(landmarks), 2), np.nan)
    lo[valid], hi[valid] = landmarks[valid].min(1), landmarks[valid].max(1)
    size = (hi - lo).max(1) * (1 + 2 * margin)
    centre = (lo + hi) / 2 - np.stack([np.zeros_like(size), 0.08 * size], 1)
    params = np.concatenate([centre, size[:, None]], 1)
    t = np.arange(len(landmarks))
    for j in range(3):  # fill frames without a face from their neighbours
        params[~valid, j] = np.interp(t[~valid], t[valid], params[valid, j])
    if smooth_frames > 0 and len(params) > 1:
        params = ndimage.gaussian_filter1d(params, smooth_frames, axis=0, mode="nearest")
    half = params[:, 2:3] / 2
    return np.concatenate([params[:, :2] - half, params[:, :2] + half], 1).astype(np.float32)


def crop_face(frame: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crops `box` (x0, y0, x1, y1; may leave the frame: zero fill) and resizes to size^2.

    Boxes are in PIL's continuous coordinates, where pixel i spans [i, i + 1); landmarks put
    pixel centres at integers, so they convert with a half-pixel shift (landmarks_to_crop).
    """
    img = Image.fromarray(frame)
    extent = tuple(float(v) for v in box)
    cropped = img.transform((size, size), Image.Transform.EXTENT, extent, Image.Resampling.BICUBIC)
    return np.asarray(cropped)


def landmarks_to_crop(landmarks: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Maps (.., 68, 2) source pixels into the `size` crop of `box` (pixel centres at ints)."""
    scale = size / (box[..., 2:] - box[..., :2])
    return ((landmarks + 0.5 - box[..., None, :2]) * scale[..., None, :] - 0.5).astype(np.float32)


def crop_to_source(points: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Inverse of `landmarks_to_crop`."""
    scale = (box[..., 2:] - box[..., :2]) / size
    return ((points + 0.5) * scale[..., None, :] + box[..., None, :2] - 0.5).astype(np.float32)
