"""PSNR / SSIM against scikit-image, the implementation the paper's numbers come from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dithead_jax.evaluation.image_metrics import gaussian_kernel1d, psnr, ssim

TOL = 1e-4


def sk_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 255.0) -> float:
    return structural_similarity(
        x,
        y,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=-1,
    )


def sk_psnr(x: np.ndarray, y: np.ndarray, data_range: float = 255.0) -> float:
    with np.errstate(divide="ignore"):
        return peak_signal_noise_ratio(x, y, data_range=data_range)


def structured_pairs() -> tuple[np.ndarray, np.ndarray]:
    """A real photo under typical degradations, plus flat and edge cases (uint8, 64x72)."""
    rng = np.random.default_rng(1)
    photo = data.astronaut()[100:292:3, 150:366:3]  # (64, 72, 3): face, edges, flat areas
    f = photo.astype(np.float64)
    as_u8 = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)
    blurred = (f + np.roll(f, 1, 0) + np.roll(f, 1, 1) + np.roll(f, (1, 1), (0, 1))) / 4
    flat = np.full_like(photo, 230)
    pairs = [
        (photo, as_u8(f + rng.normal(0, 8, f.shape))),  # mild noise
        (photo, as_u8(f + rng.normal(0, 40, f.shape))),  # heavy noise
        (photo, as_u8(blurred)),
        (photo, np.roll(photo, 3, axis=1)),  # misalignment
        (photo, as_u8(f * 0.7 + 20)),  # contrast / brightness change
        (flat, as_u8(flat + rng.integers(-2, 3, flat.shape))),  # near-flat: tiny variances
        (photo, photo),  # identical
        (np.zeros_like(photo), np.full_like(photo, 255)),  # extremes
    ]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_gaussian_window_is_scipys() -> None:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros((23,))
    impulse[11] = 1.0
    expected = gaussian_filter(impulse, 1.5, truncate=3.5, mode="reflect")[6:17]
    kernel = gaussian_kernel1d(1.5, 3.5)
    assert kernel.shape == (11,)
    np.testing.assert_allclose(kernel, expected, atol=1e-15)


def test_random_uint8_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-30, 31, x.shape), 0, 255).astype(np.uint8)
    y[2] = rng.integers(0, 256, y[2].shape, dtype=np.uint8)  # independent noise: SSIM ~ 0
    ours_ssim, ours_psnr = np.asarray(ssim(x, y)), np.asarray(psnr(x, y))
    ref_ssim = [sk_ssim(a, b) for a, b in zip(x, y, strict=True)]
    ref_psnr = [sk_psnr(a, b) for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(ours_ssim, ref_ssim, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours_psnr, ref_psnr, atol=TOL, rtol=0)


def test_structured_images_match_skimage() -> None:
    x, y = structured_pairs()
    ours_ssim, ours_psnr = np.asarray(ssim(x, y)), np.asarray(psnr(x, y))
    ref_ssim = np.array([sk_ssim(a, b) for a, b in zip(x, y, strict=True)])
    ref_psnr = np.array([sk_psnr(a, b) for a, b in zip(x, y, strict=True)])
    np.testing.assert_allclose(ours_ssim, ref_ssim, atol=TOL, rtol=0)
    finite = np.isfinite(ref_psnr)
    np.testing.assert_allclose(ours_psnr[finite], ref_psnr[finite], atol=TOL, rtol=0)
    assert ours_ssim[6] == pytest.approx(1.0, abs=1e-6)
    assert np.isposinf(ours_psnr[6]) and not finite[6]


def test_float_images_and_data_range() -> None:
    """[0, 1] floats with data_range=1, and [-1, 1] floats with data_range=2."""
    x, y = structured_pairs()
    x01, y01 = x[:5].astype(np.float32) / 255, y[:5].astype(np.float32) / 255
    ref = [sk_ssim(a, b, data_range=1.0) for a, b in zip(x01, y01, strict=True)]
    np.testing.assert_allclose(ssim(x01, y01, 1.0), ref, atol=TOL, rtol=0)
    # The luminance term is not shift-invariant, so [-1, 1] data gets its own reference.
    xm, ym = 2 * x01 - 1, 2 * y01 - 1
    ref_m = [sk_ssim(a, b, data_range=2.0) for a, b in zip(xm, ym, strict=True)]
    np.testing.assert_allclose(ssim(xm, ym, 2.0), ref_m, atol=TOL, rtol=0)
    ref_psnr = [sk_psnr(a, b, data_range=1.0) for a, b in zip(x01, y01, strict=True)]
    np.testing.assert_allclose(psnr(x01, y01, 1.0), ref_psnr, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(x01, y01)


def test_grayscale_leading_dims_and_jit() -> None:
    x, y = structured_pairs()
    gx, gy = x[:4, ..., :1], y[:4, ..., :1]  # (4, H, W, 1)
    ref = np.array([sk_ssim(a, b) for a, b in zip(gx, gy, strict=True)])
    ours = ssim(gx.reshape(2, 2, *gx.shape[1:]), gy.reshape(2, 2, *gy.shape[1:]))
    assert ours.shape == (2, 2)
    np.testing.assert_allclose(np.asarray(ours).ravel(), ref, atol=TOL, rtol=0)
    # data_range may be traced (one compilation for any range).
    traced = jax.jit(lambda a, b, r: ssim(a, b, r))(gx, gy, jnp.float32(255.0))
    np.testing.assert_allclose(traced, ref, atol=TOL, rtol=0)


def test_ssim_is_differentiable() -> None:
    x, y = structured_pairs()
    xf, yf = jnp.asarray(x[:2], jnp.float32) / 255, jnp.asarray(y[:2], jnp.float32) / 255
    grad = jax.grad(lambda a: jnp.sum(ssim(a, yf, 1.0)))(xf)
    assert grad.shape == xf.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_rejects_bad_shapes() -> None:
    small = np.zeros((1, 10, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="window"):
        ssim(small, small)
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 16, 17, 3), np.uint8))
