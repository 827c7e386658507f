"""The synthetic mouth-sync expert: fitted on some identities, it reads the opening of others."""

import numpy as np
import pytest

from dithead_jax.config import SyntheticConfig
from dithead_jax.data.faces import crop_face, face_boxes, landmarks_to_crop
from dithead_jax.data.synthetic_dataset import render_synthetic_clip
from dithead_jax.evaluation.mouth import MouthExpert, sync_correlation

CFG = SyntheticConfig(identities=5, clips=1, seconds=2.4, size=192, seed=9)


@pytest.fixture(scope="module")
def crops():
    """Face crops at 64 px (the demo's size) with crop-space landmarks and true openings."""
    out = []
    for identity in range(CFG.identities):
        clip, _, _ = render_synthetic_clip(CFG, identity, 0)
        boxes = face_boxes(clip.landmarks)
        frames = np.stack([crop_face(f, b, 64) for f, b in zip(clip.frames, boxes, strict=True)])
        out.append((frames, landmarks_to_crop(clip.landmarks, boxes, 64), clip.mouth_open))
    return out


def test_expert_reads_held_out_identities(crops, tmp_path):
    train = crops[:4]
    expert = MouthExpert.fit(*(np.concatenate(parts) for parts in zip(*train, strict=True)))
    frames, landmarks, truth = crops[4]
    measured = expert.predict(frames, landmarks)
    assert sync_correlation(measured, truth) > 0.9
    # Frames that do not match the speech score nothing: the control the report shows.
    shuffled = np.random.default_rng(0).permutation(len(frames))
    assert abs(sync_correlation(measured[shuffled], truth)) < 0.4
    expert.save(tmp_path / "expert.npz")
    np.testing.assert_array_equal(MouthExpert.load(tmp_path / "expert.npz").weights, expert.weights)


def test_sync_correlation_of_constant_signals_is_zero():
    assert sync_correlation(np.ones(5), np.arange(5)) == 0.0
    assert sync_correlation(np.arange(5), np.arange(5) * 2.0) == pytest.approx(1.0)


def test_flicker_is_one_for_the_real_video_and_grows_with_frame_noise():
    from dithead_jax.evaluation.evaluate import flicker

    rng = np.random.default_rng(0)
    ramp = np.linspace(100, 127, 10)[:, None, None, None]
    real = np.broadcast_to(ramp, (10, 8, 8, 3)).astype(np.uint8)
    mask = np.zeros((10, 8, 8), np.uint8)
    mask[:, 4:] = 255
    assert flicker(real, real, mask) == pytest.approx(1.0)
    assert flicker(real, np.repeat(real[:1], 10, 0), mask) == 0.0
    noisy = np.clip(real + rng.integers(-20, 21, real.shape), 0, 255).astype(np.uint8)
    assert flicker(real, noisy, mask) > 2
    # Only the masked half counts: noise above the mask is not flicker of the mouth.
    upper = real.copy()
    upper[:, :4] = noisy[:, :4]
    assert flicker(real, upper, mask) == pytest.approx(1.0)
