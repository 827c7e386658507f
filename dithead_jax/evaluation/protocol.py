"""The paper's scoring protocol: the dubbed video is scored, not the decoder's raw crops.

DiT-Head (Mir et al., ICAART 2024, Sec. 4.1) compares "padded face-crop videos" of every
method: crops around the face, with a margin ("a padded area for blending assessment"),
taken from each method's final video. Ours: every generated crop goes back into its source
frame through its stage-1 crop box with the soft lower-face mask (`generation.paste_back`,
as sample.py's dubbing does), and the crop is re-taken from that frame with the same box
and size (`faces.crop_face`, as stage 1 took it: the margin is the padding). The real crop
is the same box of the untouched source frame. So the seam and both resamplings are scored,
and outside the mask the composite is the source video.

Without the source video (moved, or a dataset made before stage 1 recorded it) the
composite is made in crop space (`composite`: the same blend, no resampling) and the report
says so. The speech for LSE comes from the dataset too (data/sources.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dithead_jax.data.faces import crop_face
from dithead_jax.data.sources import Source, frames_at, load_source, speech_under
from dithead_jax.data.video_io import MediaError, probe_video
from dithead_jax.generation import paste_back

PASTED = (
    "each generated face pasted back into its source frame and the face crop re-taken with "
    "the stage-1 box (real: the same box of the untouched frame)"
)
CROP_SPACE = "each generated face blended into the real crop in crop space (no source video)"


def composite(real: np.ndarray, fake: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The generated lower face blended into the real crop with the soft mask, as paste-back
    does in the source frame, without the resampling. (T, S, S, 3) uint8 x2, (T, S, S)
    uint8 alpha -> (T, S, S, 3) uint8."""
    alpha = mask[..., None].astype(np.float32) / 255
    mixed = alpha * fake.astype(np.float32) + (1 - alpha) * real.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ClipSource:
    """A clip's speech and source video, or why the evaluation goes without them."""

    speech: np.ndarray | None  # (frames x 640,) float32 in [-1, 1], 16 kHz
    video: Path | None  # None: composite in crop space
    speech_missing: str = ""
    video_missing: str = ""


def clip_source(
    dataset: Path,
    source_id: str,
    layout: str | None,
    frame_index: np.ndarray,
    source_size: np.ndarray | None,
) -> ClipSource:
    """What the stage-1 dataset keeps of the clip's video (`data.sources.load_source`),
    cut to the clip's frames; a video whose frame size is not the one stage 1 read is not
    used (it is another file now)."""
    found: Source = load_source(dataset, source_id, layout)
    speech = None
    if found.speech is not None:
        speech = speech_under(found.speech, int(frame_index[0]), len(frame_index))
    video, video_missing = found.video, found.video_missing
    if video is not None and source_size is not None:
        try:
            info = probe_video(video)
        except MediaError as e:
            video, video_missing = None, str(e)
        else:
            if (info.height, info.width) != tuple(int(v) for v in source_size):
                video_missing = (
                    f"{video}: {info.width}x{info.height} frames, stage 1 read "
                    f"{int(source_size[1])}x{int(source_size[0])} (not the same video)"
                )
                video = None
    return ClipSource(speech, video, found.speech_missing, video_missing)


def pasted_crops(
    video: Path,
    frame_index: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    fakes: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One streaming pass over the source frames: the real crops (T, S, S, 3) and, per
    entry of `fakes` ((T, S, S, 3) uint8 generated crops), the crops re-taken from the
    pasted-back frames. boxes (T, 4) and masks (T, S, S) uint8 are the clip's stage-1
    records. Raises MediaError when the video cannot give the frames."""
    size = masks.shape[1]
    real, pasted = [], {name: [] for name in fakes}
    for t, source in enumerate(frames_at(video, frame_index)):
        real.append(crop_face(source, boxes[t], size))
        alpha = masks[t].astype(np.float32) / 255
        for name, fake in fakes.items():
            frame = paste_back(source, fake[t], boxes[t], alpha)
            pasted[name].append(crop_face(frame, boxes[t], size))
    return np.stack(real), {name: np.stack(crops) for name, crops in pasted.items()}
