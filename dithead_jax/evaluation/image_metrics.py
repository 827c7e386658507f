"""PSNR and SSIM in JAX, numerically matching scikit-image.

The paper's table is computed with the usual scikit-image calls, so ours reproduce them
exactly rather than approximately:

    peak_signal_noise_ratio(x, y, data_range=255)
    structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                          use_sample_covariance=False, data_range=255, channel_axis=-1)

Details that matter for agreement (scikit-image 0.26 / scipy.ndimage):
- Gaussian window radius int(truncate * sigma + 0.5) with truncate 3.5 -> 11 taps for
  sigma 1.5, normalised to sum 1, applied separably along H then W.
- scipy's ``mode="reflect"`` is numpy's ``"symmetric"`` padding (edge sample repeated).
- The SSIM map is cropped by (win_size - 1) // 2 on every side before the mean.
- Colour SSIM is the mean over channels of per-channel SSIM; every channel has the same
  number of pixels, so that equals the mean over the whole cropped (H, W, C) map.

Both functions take images shaped (..., H, W, C), any leading batch dims, and return one
value per image. They jit (window size is static; `data_range` may be traced) and are
differentiable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from dithead_jax.data.masks import gaussian_kernel_1d


def _default_data_range(x: jax.Array, data_range: ArrayLike | None) -> ArrayLike:
    # scikit-image guesses a range from integer dtypes but refuses to guess for floats, since
    # [0, 1] vs [-1, 1] vs [0, 255] floats are all common. Same here.
    if data_range is not None:
        return data_range
    if x.dtype == jnp.uint8:
        return 255.0
    raise ValueError(f"data_range is required for {x.dtype} images (e.g. 1.0 or 255.0)")


def _compute_dtype(x: jax.Array, y: jax.Array) -> jnp.dtype:
    # At least f32 (uint8 and bf16 inputs are promoted); f64 inputs stay f64 under x64.
    return jnp.result_type(x.dtype, y.dtype, jnp.float32)


def _check_shapes(x: jax.Array, y: jax.Array) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim < 3:
        raise ValueError(f"expected (..., H, W, C) images, got shape {x.shape}")


@jax.jit
def psnr(x: ArrayLike, y: ArrayLike, data_range: ArrayLike | None = None) -> Float[Array, "..."]:
    """Peak signal-to-noise ratio in dB, one value per image.

    x, y: (..., H, W, C) images, uint8 or float. data_range: max - min of the value scale
    (255 for uint8, required for float). Identical images give +inf, as in scikit-image.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_shapes(x, y)
    data_range = _default_data_range(x, data_range)
    dtype = _compute_dtype(x, y)
    diff = x.astype(dtype) - y.astype(dtype)
    mse = jnp.mean(diff * diff, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(jnp.asarray(data_range, dtype) ** 2 / mse)


def gaussian_kernel1d(sigma: float, truncate: float = 3.5) -> np.ndarray:
    """scipy.ndimage's normalised 1-D Gaussian; length 2 * int(truncate * sigma + 0.5) + 1."""
    return gaussian_kernel_1d(2 * int(truncate * sigma + 0.5) + 1, sigma)


def _filter_axis(x: jax.Array, kernel: np.ndarray, axis: int) -> jax.Array:
    """Correlate along one spatial axis with symmetric ("reflect" in scipy) borders.

    A weighted sum of shifted slices rather than `lax.conv`: exact f32 arithmetic on every
    backend (TPU convs default to bf16 passes), and XLA fuses it into a single loop.
    """
    radius = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="symmetric")
    size = x.shape[axis]
    out = jnp.zeros_like(x)
    for offset, weight in enumerate(kernel):
        out = out + float(weight) * jax.lax.slice_in_dim(padded, offset, offset + size, axis=axis)
    return out


def _gaussian_filter(x: Float[Array, "... h w c"], kernel: np.ndarray) -> jax.Array:
    return _filter_axis(_filter_axis(x, kernel, x.ndim - 3), kernel, x.ndim - 2)


@functools.partial(jax.jit, static_argnames=("sigma", "truncate"))
def ssim_map(
    x: ArrayLike,
    y: ArrayLike,
    data_range: ArrayLike | None = None,
    *,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Float[Array, "... h w c"]:
    """Per-pixel, per-channel SSIM (Wang et al. 2004), uncropped; see `ssim` for the mean.

    Population (not sample) covariance with Gaussian weights, as in the original paper.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_shapes(x, y)
    kernel = gaussian_kernel1d(sigma, truncate)
    if min(x.shape[-3], x.shape[-2]) < len(kernel):
        raise ValueError(f"images {x.shape[-3:-1]} are smaller than the {len(kernel)}-px window")
    data_range = _default_data_range(x, data_range)
    dtype = _compute_dtype(x, y)
    x, y = x.astype(dtype), y.astype(dtype)

    # Variances come as E[x^2] - E[x]^2, which cancels badly in f32 when E[x] is large
    # (0..255 data). Both terms are unchanged by shifting x (and y) by a constant because the
    # window weights sum to 1 everywhere (padding copies pixels, never adds zeros), so shift
    # by each image's per-channel mean first and add it back only to the local means.
    x_shift = jax.lax.stop_gradient(jnp.mean(x, axis=(-3, -2), keepdims=True))
    y_shift = jax.lax.stop_gradient(jnp.mean(y, axis=(-3, -2), keepdims=True))
    xc, yc = x - x_shift, y - y_shift
    # One filter pass over all five statistics: stacked on a new leading axis.
    stats = _gaussian_filter(jnp.stack([xc, yc, xc * xc, yc * yc, xc * yc]), kernel)
    mu_xc, mu_yc, e_xx, e_yy, e_xy = stats
    var_x = e_xx - mu_xc * mu_xc
    var_y = e_yy - mu_yc * mu_yc
    cov_xy = e_xy - mu_xc * mu_yc
    mu_x, mu_y = mu_xc + x_shift, mu_yc + y_shift

    data_range = jnp.asarray(data_range, dtype)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return numerator / denominator


@functools.partial(jax.jit, static_argnames=("sigma", "truncate"))
def ssim(
    x: ArrayLike,
    y: ArrayLike,
    data_range: ArrayLike | None = None,
    *,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Float[Array, "..."]:
    """Mean SSIM per image, matching scikit-image's Gaussian-weighted SSIM.

    x, y: (..., H, W, C), H and W at least the window size (11 for sigma 1.5).
    Returns (...,): the mean over channels and over the map with a window-radius border
    cropped away (scikit-image ignores pixels whose window hangs over the edge).
    """
    smap = ssim_map(x, y, data_range, sigma=sigma, truncate=truncate, k1=k1, k2=k2)
    crop = int(truncate * sigma + 0.5)  # == (win_size - 1) // 2
    h, w = smap.shape[-3], smap.shape[-2]
    cropped = smap[..., crop : h - crop, crop : w - crop, :]
    return jnp.mean(cropped, axis=(-3, -2, -1))
