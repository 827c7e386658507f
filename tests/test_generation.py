"""Paste-back and length matching for sample.py."""

import numpy as np

from dithead_jax.config import DataConfig, SyntheticConfig
from dithead_jax.data.faces import crop_face, face_boxes, landmarks_to_crop
from dithead_jax.data.masks import lower_face_mask
from dithead_jax.generation import frames_for_audio, paste_back, pingpong_indices
from dithead_jax.synthetic.dataset import render_synthetic_clip


def test_pingpong_loops_without_jumps():
    np.testing.assert_array_equal(pingpong_indices(4, 10), [0, 1, 2, 3, 2, 1, 0, 1, 2, 3])
    np.testing.assert_array_equal(pingpong_indices(1, 3), [0, 0, 0])
    assert frames_for_audio(100, 16_000 * 3 + 100, 16_000, 25) == 75


def test_paste_back_of_the_original_crop_restores_the_frame():
    clip, _, _ = render_synthetic_clip(SyntheticConfig(identities=1, seconds=0.2, size=128), 0, 0)
    frame = clip.frames[2]
    box = face_boxes(clip.landmarks)[2]
    crop = crop_face(frame, box, 128)  # same resolution: resampling error only
    alpha = lower_face_mask(landmarks_to_crop(clip.landmarks[2], box, 128), 128, DataConfig())
    pasted = paste_back(frame, crop, box, alpha)
    err = np.abs(pasted.astype(int) - frame.astype(int))
    assert err.mean() < 1.0 and np.percentile(err, 99) <= 12
    # Outside the mask nothing changes; a black face shows up exactly where the mask is.
    dark = paste_back(frame, np.zeros_like(crop), box, alpha)
    changed = np.abs(dark.astype(int) - frame.astype(int)).sum(-1) > 0
    mouth = np.round(clip.landmarks[2, 48:68]).astype(int)
    assert np.all(dark[mouth[:, 1], mouth[:, 0]] == 0)
    eyes = np.round(clip.landmarks[2, 36:48]).astype(int)
    assert not changed[eyes[:, 1], eyes[:, 0]].any()


def test_paste_back_handles_boxes_leaving_the_frame():
    source = np.full((40, 50, 3), 100, np.uint8)
    face = np.full((16, 16, 3), 200, np.uint8)
    out = paste_back(source, face, np.array([-10.0, -10.0, 10.0, 10.0]), np.ones((16, 16)))
    assert out[:10, :10].min() >= 190 and np.all(out[12:, 12:] == 100)
