"""Preprocessing pieces: the lower-face mask, crops and landmark mapping, audio features."""

import numpy as np
import pytest
from skimage import data as skdata

from dithead_jax.config import DataConfig, SyntheticConfig
from dithead_jax.data import audio_features as af
from dithead_jax.data.faces import (
    crop_face,
    crop_to_source,
    dlib_landmarker,
    face_boxes,
    landmarks_to_crop,
)
from dithead_jax.data.masks import apply_mask, blur_params, gaussian_kernel_1d, lower_face_mask
from dithead_jax.synthetic.dataset import render_synthetic_clip

CFG = DataConfig()


@pytest.fixture(scope="module")
def clip():
    rendered, audio, _ = render_synthetic_clip(
        SyntheticConfig(identities=1, clips=1, seconds=1.2, size=256, seed=3), 0, 0
    )
    return rendered, audio


def test_mask_hides_the_whole_mouth_and_spares_the_eyes(clip):
    rendered, _ = clip
    for t in range(0, len(rendered.frames), 5):
        lm = rendered.landmarks[t]
        alpha = lower_face_mask(lm, 256, CFG)
        rows, cols = np.round(lm[:, 1]).astype(int), np.round(lm[:, 0]).astype(int)
        assert np.all(alpha[rows[48:68], cols[48:68]] == 1.0), "lips must be fully hidden"
        assert np.all(alpha[rows[36:48], cols[36:48]] == 0.0), "eyes must stay visible"
        soft = (alpha > 0.02) & (alpha < 0.98)
        assert soft.sum() > 200, "the edge must be a Gaussian blend, not a hard cut"
        masked = apply_mask(rendered.frames[t], alpha)
        assert np.all(masked[rows[60:68], cols[60:68]] == 0)
        np.testing.assert_array_equal(masked[alpha == 0], rendered.frames[t][alpha == 0])


def test_mask_blur_scales_with_size_and_shift_moves_it(clip):
    assert blur_params(256, CFG) == (27, 5.0)
    assert blur_params(128, CFG) == (15, 2.5)  # 13.5 -> 14 -> odd
    assert blur_params(512, CFG) == (55, 10.0)
    lm = clip[0].landmarks[0]
    base = lower_face_mask(lm, 256, CFG)
    moved = lower_face_mask(lm, 256, CFG, shift=(4, -3))
    centroid = lambda a: (
        np.array([(a * np.arange(256)[None]).sum(), (a * np.arange(256)[:, None]).sum()]) / a.sum()
    )  # noqa: E731,E501
    np.testing.assert_allclose(centroid(moved) - centroid(base), [4, -3], atol=0.3)


def test_gaussian_kernel_matches_scipy():
    from scipy.signal.windows import gaussian

    for size, sigma in [(27, 5.0), (15, 2.5), (4, 1.5)]:
        want = gaussian(size, sigma)
        np.testing.assert_allclose(gaussian_kernel_1d(size, sigma), want / want.sum(), rtol=1e-6)


def test_mask_support_is_the_hull_grown_by_dilation_then_blur(clip):
    """alpha > 0 reaches exactly round(2 sigma) (dilation) + kernel // 2 (blur) pixels past
    the hull on each side, in both axes: a wider dilation or a blur run twice along one axis
    moves an edge."""
    from scipy.spatial import ConvexHull
    from skimage.draw import polygon2mask

    lm = clip[0].landmarks[0]
    points = np.asarray(lm, np.float64)[list(CFG.mask_hull)]
    inside = polygon2mask((256, 256), points[ConvexHull(points).vertices][:, ::-1])
    size, sigma = blur_params(256, CFG)
    reach = int(round(2 * sigma)) + size // 2
    alpha = lower_face_mask(lm, 256, CFG)
    for axis in (0, 1):  # rows, then columns
        held = np.flatnonzero(inside.any(1 - axis))
        covered = np.flatnonzero((alpha > 0).any(1 - axis))
        assert held[0] - reach > 0 and held[-1] + reach < 255  # the edges are in the image
        assert (covered[0], covered[-1]) == (held[0] - reach, held[-1] + reach)


def test_crop_maps_landmarks_onto_the_same_pixels(clip):
    rendered, _ = clip
    frame, lm = rendered.frames[0], rendered.landmarks[0]
    box = np.array([60.3, 40.7, 200.1, 180.5], np.float32)
    crop = crop_face(frame, box, 128)
    mapped = landmarks_to_crop(lm, box, 128)
    np.testing.assert_allclose(crop_to_source(mapped, box, 128), lm, atol=1e-3)
    # Colours at the pupils agree between the frame and the crop.
    for eye in (slice(36, 42), slice(42, 48)):
        src = np.round(lm[eye].mean(0)).astype(int)
        dst = np.round(mapped[eye].mean(0)).astype(int)
        np.testing.assert_allclose(
            crop[dst[1], dst[0]].astype(int), frame[src[1], src[0]].astype(int), atol=40
        )


def test_face_boxes_are_square_smooth_and_fill_missing_frames():
    rng = np.random.default_rng(0)
    base = rng.uniform(80, 160, (68, 2))
    landmarks = base[None] + rng.normal(0, 1.5, (30, 68, 2))  # detector jitter
    landmarks[10:13] = np.nan
    boxes = face_boxes(landmarks)
    side = boxes[:, 2:] - boxes[:, :2]
    np.testing.assert_allclose(side[:, 0], side[:, 1], rtol=1e-5)
    assert np.all(np.isfinite(boxes))
    raw = face_boxes(landmarks, smooth_frames=0)
    centre_jitter = lambda b: np.std(np.diff((b[:, 0] + b[:, 2]) / 2))  # noqa: E731
    assert centre_jitter(boxes) < 0.5 * centre_jitter(raw)


def test_dlib_finds_68_points_on_a_real_face():
    image = skdata.astronaut()
    points = dlib_landmarker()(image)
    assert points.shape == (68, 2)
    # The astronaut's face lies around x 150-230, y 60-160 in this 512x512 image.
    assert 130 < points[:, 0].mean() < 250 and 60 < points[:, 1].mean() < 180
    assert points[36:42, 0].mean() < points[42:48, 0].mean()  # iBUG order: image-left eye first
    assert points[8, 1] > points[33, 1] > points[27, 1]  # chin below nose below bridge


def test_logmel_frames_line_up_with_video_frames():
    sr, fps, frames = 16_000, 25, 50
    audio = np.zeros(frames * sr // fps, np.float32)
    audio += 1e-4 * np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)
    start = 17 * sr // fps  # a 1 kHz burst filling video frames 17..19
    audio[start : start + 3 * sr // fps] += np.sin(2 * np.pi * 1000 * np.arange(3 * sr // fps) / sr)
    feats = af.logmel_features(audio, sr, frames, fps)
    assert feats.shape == (frames, 33)
    energy = feats.max(1)
    loud = np.flatnonzero(energy > energy.min() + 0.5 * np.ptp(energy))
    assert loud.min() >= 16 and loud.max() <= 20 and {17, 18, 19} <= set(loud)


@pytest.mark.parametrize("offset", [-0.4, 0.0, 0.4])
def test_logmel_click_peaks_in_the_frame_whose_window_centre_is_nearest(offset):
    """Sub-frame timing: frame j's window is centred on (j + 0.5) / fps, the middle of video
    frame j. A 2 ms click 0.4 frame (16 ms) either side of that centre must still peak in
    frame j; features half a frame (20 ms) early or late put it in a neighbour."""
    sr, fps, frames, j = 16_000, 25, 40, 20
    hop = sr // fps
    audio = 1e-4 * np.random.default_rng(1).standard_normal(frames * hop).astype(np.float32)
    width = 32
    centre = int(round((j + 0.5 + offset) * hop))
    audio[centre - width // 2 : centre + width // 2] += np.hanning(width) * np.sin(
        2 * np.pi * 3000 * np.arange(width) / sr
    )
    energy = af.logmel_features(audio, sr, frames).mean(1)  # fps: 25 by default
    assert int(energy.argmax()) == j
    if offset == 0.0:
        # Centred: both neighbours see it equally (a shift of a few ms would tilt this).
        assert abs(energy[j - 1] - energy[j + 1]) < 0.05 * (energy[j] - np.median(energy))
    else:
        nearer = j + int(np.sign(offset))
        assert energy[nearer] > energy[2 * j - nearer]


def test_logmel_keeps_80_db_in_a_range_of_2():
    """Whisper's scaling: the loudest bin maps to max, anything 80 dB below it to max - 2."""
    sr, fps = 16_000, 25
    audio = np.zeros(20 * sr // fps, np.float32)
    audio[: 10 * sr // fps] = np.sin(2 * np.pi * 440 * np.arange(10 * sr // fps) / sr)
    feats = af.logmel_features(audio, sr, 20, fps)
    assert float(np.ptp(feats)) == pytest.approx(2.0, abs=1e-6)
    assert np.all(feats[15:] == feats.min())  # silence sits on the floor


def test_align_fills_empty_frames_from_the_feature_nearest_their_centre():
    # Features at 0.10 s and 0.30 s (frames 2 and 7 at 25 fps); frame 4 (centre 0.18 s) is
    # nearer the first, frame 5 (centre 0.22 s) the second.
    aligned = af.align_to_frames(np.array([[1.0], [2.0]]), np.array([0.10, 0.30]), 10, 25)
    assert aligned.shape == (10, 1)
    np.testing.assert_array_equal(aligned[:, 0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2])


def test_audio_windows_order_over_all_positions():
    """Position k of frame i's window holds frame i - 5 + k (k = 0..10), clamped at the ends."""
    t = 15
    per_frame = np.stack([np.arange(t), -np.arange(t)], 1).astype(np.float32)
    win = af.audio_windows(per_frame, 11)
    assert win.shape == (t, 11, 2)
    want = np.clip(np.arange(t)[:, None] - 5 + np.arange(11)[None, :], 0, t - 1)
    np.testing.assert_array_equal(win[..., 0], want)
    np.testing.assert_array_equal(win[..., 1], -want)


def test_align_and_windows():
    # 50 Hz features (centres at 20 ms steps + 12.5 ms) -> 25 fps: the mean of each pair.
    feats = np.arange(20, dtype=np.float32)[:, None]
    times = np.arange(20) * 0.02 + 0.0125
    aligned = af.align_to_frames(feats, times, 11, 25)
    np.testing.assert_allclose(aligned[:10, 0], np.arange(10) * 2 + 0.5)
    assert aligned[10, 0] == 19  # no feature inside the last frame: nearest one
    win = af.audio_windows(np.arange(6, dtype=np.float32)[:, None], 5)
    assert win.shape == (6, 5, 1)
    np.testing.assert_array_equal(win[0, :, 0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(win[5, :, 0], [3, 4, 5, 5, 5])
    with pytest.raises(ValueError):
        af.audio_windows(np.zeros((3, 1)), 4)


def test_shifted_mask_variants_for_the_stage2_records(clip):
    from dithead_jax.data.masks import mask_shifts, shifted_masked_frames

    shifts = mask_shifts(4, max_shift=4.0, seed=1)
    assert shifts.shape == (4, 2) and np.all(shifts[0] == 0) and np.abs(shifts).max() <= 4
    rendered, _ = clip
    frame, lm = rendered.frames[3], rendered.landmarks[3]
    variants = shifted_masked_frames(frame, lm, shifts, CFG)
    assert variants.shape == (4, 256, 256, 3) and variants.dtype == np.uint8
    np.testing.assert_array_equal(variants[0], apply_mask(frame, lower_face_mask(lm, 256, CFG)))
    assert all(np.any(variants[k] != variants[0]) for k in range(1, 4))


def test_face_alignment_runs_offline_from_weights_in_the_torch_hub_cache(tmp_path, monkeypatch):
    """The paper's S3FD + FAN path through the face-alignment package. Its weights download on
    first use; here random-weight checkpoints of the real networks sit in torch hub's cache
    under the names the package looks for, so the wiring runs without internet."""
    import torch
    from face_alignment.api import models_urls
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.detection.sfd.sfd_detector import models_urls as detector_urls
    from face_alignment.models import FAN

    from dithead_jax.data.faces import face_alignment_landmarker

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not load its S3FD/FAN weights"):
        monkeypatch.setattr("urllib.request.urlopen", _no_network)
        face_alignment_landmarker("cpu")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), cache / models_urls["2DFAN-4"].rsplit("/", 1)[1])
    torch.save(s3fd().state_dict(), cache / detector_urls["s3fd"].rsplit("/", 1)[1])
    # Both real networks load through our wrapper. A FAN forward takes ~1 min on this CPU,
    # so the call runs S3FD with a threshold no score reaches: the no-face path, end to end.
    landmarker = face_alignment_landmarker("cpu", filter_threshold=1.01)
    assert landmarker(np.full((32, 32, 3), 128, np.uint8)) is None


def _no_network(*args, **kwargs):
    raise OSError("network disabled in tests")


def test_latent_grid_mask_averages_each_cell(clip):
    from dithead_jax.data.latents import latent_mask

    rendered, _ = clip
    alpha = lower_face_mask(rendered.landmarks[3], 256, CFG)
    stored = np.round(alpha * 255).astype(np.uint8)[None]
    grid = latent_mask(stored, 64)  # f = 4, the paper's VQGAN
    assert grid.shape == (1, 64, 64) and grid.dtype == np.uint8
    # Each latent cell is the mean over its 4 x 4 pixels.
    cell = stored[0, 40 * 4 : 41 * 4, 30 * 4 : 31 * 4].astype(np.float64).mean()
    assert abs(int(grid[0, 40, 30]) - cell) <= 0.5
    assert abs(grid.mean() - stored.mean()) < 0.5  # area-preserving
    with pytest.raises(ValueError, match="not a multiple"):
        latent_mask(stored, 48)


def test_loss_weights_have_mean_one_and_favour_the_mask():
    from dithead_jax.data.masks import loss_weights

    alpha = np.zeros((2, 4, 4), np.float32)
    alpha[:, 2:] = 1.0
    weights = loss_weights(alpha, 3.0)
    assert weights.shape == (2, 4, 4, 1) and weights.mean() == pytest.approx(1.0)
    # Inside the mask 1 + 3 = 4 times the weight outside it.
    assert weights[0, 3, 0, 0] == pytest.approx(4 * weights[0, 0, 0, 0])
