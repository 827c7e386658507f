"""Frame interpolation in generation (interpolation.py): the uint8 interpolator against
its IFNet, `smooth` / `half_rate` / `double` streamed in chunks equal to the whole clip and
to their definitions, and their errors. The IFNet is the TESTING one with random weights:
what is under test is what is done with its frames, not how good they are."""

from __future__ import annotations

import numpy as np
import pytest
from stage2_data import random_ifnet

from dithead_jax.interpolation import SMOOTH_WEIGHT, FacePost, FrameDoubler, Interpolator

S = 16


@pytest.fixture(scope="module")
def interp() -> Interpolator:
    return Interpolator(random_ifnet(), batch=4)


def frames(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), np.uint8)


def test_interpolator_is_its_ifnet_on_uint8_frames_in_padded_batches(interp):
    a, b = frames(6, 1), frames(6, 2)
    model = random_ifnet()
    expected = np.asarray(model(a / 255.0, b / 255.0, 0.3))
    got = interp(a, b, 0.3)  # 6 pairs: a batch of 4 and one of 2 padded to 4
    assert got.dtype == np.uint8 and got.shape == a.shape
    np.testing.assert_allclose(got, np.clip(np.round(expected * 255), 0, 255), atol=1)
    with pytest.raises(ValueError, match="two"):
        interp(a, b[:3])


def run_post(mode: str, interp, faces, masks, sizes) -> np.ndarray:
    post, out, start = FacePost(mode, interp), [], 0
    for size in sizes:
        out.append(post.push(faces[start : start + size], masks[start : start + size]))
        start += size
    out.append(post.flush())
    return np.concatenate(out)


def test_smooth_blends_inside_the_mask_with_the_neighbours_interpolation(interp):
    faces, masks = frames(9), np.zeros((9, S, S), np.uint8)
    masks[:, S // 2 :] = 255  # the lower half
    whole = run_post("smooth", interp, list(faces), masks, [9])
    for sizes in ([1] * 9, [4, 5], [2, 3, 1, 3]):
        np.testing.assert_array_equal(run_post("smooth", interp, list(faces), masks, sizes), whole)
    # The clip's ends and everything outside the mask stay as generated.
    np.testing.assert_array_equal(whole[[0, -1]], faces[[0, -1]])
    np.testing.assert_array_equal(whole[:, : S // 2], faces[:, : S // 2])
    middle = interp(faces[:-2], faces[2:])
    blend = faces[1:-1] * (1 - SMOOTH_WEIGHT) + middle.astype(np.float32) * SMOOTH_WEIGHT
    np.testing.assert_array_equal(whole[1:-1, S // 2 :], np.round(blend)[:, S // 2 :])


@pytest.mark.parametrize("count", [9, 10])  # ending on a generated / a skipped frame
def test_half_rate_fills_skipped_frames_from_their_generated_neighbours(interp, count):
    faces, masks = frames(count), np.full((count, S, S), 255, np.uint8)
    given = [f if i % 2 == 0 else None for i, f in enumerate(faces)]
    whole = run_post("half_rate", interp, given, masks, [count])
    for sizes in ([1] * count, [3, count - 3], [2, 5, count - 7]):
        np.testing.assert_array_equal(run_post("half_rate", interp, given, masks, sizes), whole)
    np.testing.assert_array_equal(whole[::2], faces[::2])
    odd = np.arange(1, count - 1, 2)
    np.testing.assert_array_equal(whole[odd], interp(faces[odd - 1], faces[odd + 1]))
    if count % 2 == 0:  # a skipped last frame repeats the one before it
        np.testing.assert_array_equal(whole[-1], faces[-2])


def test_frame_doubler_interleaves_interpolations_at_twice_the_rate(interp):
    video = frames(5, 4)
    doubler, out = FrameDoubler(interp), []
    for chunk in (video[:2], video[2:3], video[3:]):
        out.append(doubler.push(chunk))
    doubled = np.concatenate(out)
    assert len(doubled) == 9
    np.testing.assert_array_equal(doubled[::2], video)
    np.testing.assert_array_equal(doubled[1::2], interp(video[:-1], video[1:]))


def test_face_post_refuses_what_it_cannot_do(interp):
    with pytest.raises(ValueError, match="off, smooth or half_rate"):
        FacePost("double", interp)
    with pytest.raises(ValueError, match="needs an interpolator"):
        FacePost("smooth", None)
