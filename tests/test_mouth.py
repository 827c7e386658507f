"""The synthetic mouth-sync expert: fitted on some identities, it reads the opening of others."""

import numpy as np
import pytest

from dithead_jax.config import SyntheticConfig
from dithead_jax.data.faces import crop_face, face_boxes, landmarks_to_crop
from dithead_jax.evaluation.mouth import MouthExpert, sync_correlation
from dithead_jax.synthetic.dataset import render_synthetic_clip

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
    from dithead_jax.evaluation.temporal import flicker

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


def test_jitter_counts_frame_jumps_more_than_motion():
    """Twice the mouth motion doubles flicker and jitter alike; frames jumping off their
    neighbours' line raise jitter well above flicker."""
    from dithead_jax.evaluation.temporal import flicker, jitter

    t = np.arange(24, dtype=np.float64)[:, None, None, None]
    x = np.arange(8, dtype=np.float64)[None, None, :, None]

    def video(amplitude: float) -> np.ndarray:  # a band sliding at speech-like speed
        return np.broadcast_to(128 + amplitude * np.sin(0.7 * x - 0.3 * t), (24, 8, 8, 3))

    real, wider = video(30.0), video(60.0)
    mask = np.full((24, 8, 8), 255, np.uint8)
    assert jitter(real, real, mask) == pytest.approx(1.0)
    assert flicker(real, wider, mask) == pytest.approx(2.0, rel=0.02)
    assert jitter(real, wider, mask) == pytest.approx(2.0, rel=0.02)
    jumpy = real + np.where(np.arange(24) % 2, 3.0, -3.0)[:, None, None, None]
    assert jitter(real, jumpy, mask) > 1.5 * flicker(real, jumpy, mask) > 1.5
    assert np.isnan(jitter(real[:2], real[:2], mask[:2]))


def test_lower_face_scores_count_only_the_composited_mask_region():
    from dithead_jax.evaluation.evaluate import composite, lower_face_scores

    real = np.full((2, 8, 8, 3), 100, np.uint8)
    fake = real.copy()
    fake[:, :4] = 0  # wrong above the mask: paste-back never shows it
    fake[:, 4:] = 110  # off by 10 inside it
    mask = np.zeros((2, 8, 8), np.uint8)
    mask[:, 4:] = 255
    np.testing.assert_array_equal(composite(real, fake, mask)[:, :4], real[:, :4])
    lpips_calls = []

    def fake_lpips(a, b):  # records what LPIPS is asked to compare
        lpips_calls.append((a.shape, b.copy()))
        return np.full(len(a), 0.25)

    scores = lower_face_scores(real, fake, mask, fake_lpips)
    assert scores["psnr_lower"] == pytest.approx(10 * np.log10(255**2 / 100))
    assert scores["psnr_composite"] == pytest.approx(10 * np.log10(255**2 / 50))
    assert scores["lpips_lower"] == 0.25
    ((shape, seen),) = lpips_calls
    assert shape == (2, 4, 8, 3) and (seen == 110).all()  # the lower half of the composite
    # Half-transparent mask edge: only pixels with alpha >= 1/2 count, blended 50/50.
    mask[:, 4] = 128
    edge = lower_face_scores(real, fake, mask)["psnr_lower"]
    assert edge > scores["psnr_lower"] and "lpips_lower" not in lower_face_scores(real, fake, mask)


def test_evaluation_protocol_values_on_a_known_answer(tmp_path, monkeypatch):
    """`_score_clip` + `_report` with a stand-in generator whose frames carry the driving
    audio in one pixel and an expert that reads that pixel back, so every sync number has a
    hand-computed answer: mode A follows the audio (1), mode B its negation (-1); the control
    is driven by the shuffled audio; truth is read at the clip's source frames
    (`frame_index`, here 3..8 of a 12-frame video), not frames 0..5; and correlations pool
    both clips' frames per mode instead of averaging per-clip values."""
    from dithead_jax import sampling
    from dithead_jax.evaluation import evaluate as ev

    size, steps = 16, 3
    rng = np.random.default_rng(4)

    def generate(models, masked, audio, reference, *, steps, mode, seed, **conditions):
        signal = audio[:, 5, 0]  # the window's centre
        if mode == "B":  # plus an offset per clip (masked frames hold the clip number)
            signal = -0.5 * signal + 0.55 * masked[:, 0, 0, 0]
        fake = np.full((len(audio), size, size, 3), 128, np.uint8)
        fake[:, 0, 0, 0] = np.round(128 + 100 * signal).astype(np.uint8)
        return fake

    class PixelExpert:
        def predict(self, frames, landmarks):
            return (frames[:, 0, 0, 0].astype(np.float64) - 128) / 100

    monkeypatch.setattr(sampling, "generate_faces", generate)
    monkeypatch.setattr(sampling, "reconstruct_faces", lambda models, frames: frames)
    options = ev.EvalOptions(modes=("A", "B"), synthetic=tmp_path, side_by_side=False, steps=steps)
    scorers = ev._Scorers(lpips=None, expert=PixelExpert(), fid=None, lse=None)
    clips, truths, shuffles = [], [], []
    for k, (length, first) in enumerate([(12, 3), (10, 0)]):
        # Openings on a 1/50 grid (exact through the uint8 pixel at either gain), never 0
        # (finite PSNR).
        opening = rng.choice([-1, 1], length) * rng.integers(5, 51, length) / 50
        np.savez(tmp_path / f"v{k}.npz", mouth_open=opening, audio=np.zeros(16_000))
        frame_index = np.arange(first, first + 6)
        audio = np.zeros((6, 11, 2), np.float32)
        audio[:, 5, 0] = opening[frame_index]  # stage-1 records carry the aligned audio
        frames = np.full((6, size, size, 3), 128, np.uint8)
        masked = np.full_like(frames, k)
        clip = ev.Clip(f"v{k}", "id", frames, masked, np.zeros((6, size, size), np.uint8),
                       np.zeros((6, 68, 2)), audio, frame_index)  # fmt: skip
        shuffles.append(np.random.default_rng(k).permutation(6))
        truths.append(opening[frame_index])
        clips.append(
            ev._score_clip(None, clip, frames[0], shuffles[-1], scorers, tmp_path, options)
        )

    truth = np.concatenate(truths)
    control = np.concatenate([t[s] for t, s in zip(truths, shuffles, strict=True)])
    np.testing.assert_allclose(clips[0]["truth"], truths[0])
    np.testing.assert_allclose(clips[0]["measured"]["A"], truths[0], atol=1e-9)
    assert clips[0]["rows"]["A"]["sync"] == pytest.approx(1.0)
    assert clips[0]["rows"]["B"]["sync"] == pytest.approx(-1.0)
    assert clips[0]["rows"]["B"]["frames"] == 6

    report = ev._report(clips, options, {"status": "unavailable", "reason": "x"}, "x", "x", False)
    want_control = np.corrcoef(control, truth)[0, 1]
    assert abs(want_control) < 0.9  # the shuffle really decorrelates
    modes = report["modes"]
    assert modes["A"]["sync"] == pytest.approx(1.0)
    assert modes["A"]["sync_control"] == pytest.approx(want_control)
    # B: -1 within each clip, but pooled over clips the offsets show.
    offsets = np.repeat([0.0, 0.55], 6)
    assert modes["B"]["sync"] == pytest.approx(np.corrcoef(-0.5 * truth + offsets, truth)[0, 1])
    assert modes["B"]["sync"] > -0.95
    want_b = np.corrcoef(-0.5 * control + offsets, truth)[0, 1]
    assert modes["B"]["sync_control"] == pytest.approx(want_b)
    # The headline numbers are the first mode's; the calibration and ceiling read real frames
    # (all 128 here: constant, so 0 by definition).
    assert report["sync"]["correlation"] == pytest.approx(1.0)
    assert report["sync"]["control_correlation"] == pytest.approx(want_control)
    assert report["sync"]["expert_calibration"] == 0.0
    assert [r["mode"] for r in report["clips"]] == ["A", "A", "B", "B"]
    # PSNR: one pixel off by 100 |signal| of 16 x 16 x 3; per clip the frame mean, per mode
    # the clip mean.
    for mode, error in (("A", lambda t, k: 100 * t), ("B", lambda t, k: -50 * t + 55 * k)):
        per_clip = [
            np.mean(10 * np.log10(255**2 * size * size * 3 / error(t, k) ** 2))
            for k, t in enumerate(truths)
        ]
        assert modes[mode]["psnr"] == pytest.approx(np.mean(per_clip), rel=1e-5)
        assert report["clips"][0 if mode == "A" else 2]["psnr"] == pytest.approx(
            per_clip[0], rel=1e-5
        )
    assert report["metrics"]["psnr"] == modes["A"]["psnr"]
    # Pooled over clips, not a mean of per-clip correlations.
    per_clip = [np.corrcoef(t[s], t)[0, 1] for t, s in zip(truths, shuffles, strict=True)]
    assert not np.isclose(np.mean(per_clip), want_control)
