"""RIFE's IFNet (Huang et al., ECCV 2022) in the Practical-RIFE v4.25 / v4.26 layout, Flax NNX.

Video frame interpolation by *backward* warping: the network estimates, for a time t in
[0, 1] between two frames, the flows F_t->0 and F_t->1 and a fusion mask m, and the frame at
t is m * warp(I0, F_t->0) + (1 - m) * warp(I1, F_t->1). This is the architecture of the
released `flownet.pkl` of Practical-RIFE 4.25 / 4.26 (`train_log/IFNet_HDv3.py`; the `ccvfi`
and `cccv` packages ship the same module); `convert/rife_weights.py` imports those weights.

    encode (shared by both frames, `encoder_channels` = E):
      conv 3x3 /2 -> E, LeakyReLU(0.2), conv 3x3 -> E, LReLU, conv 3x3 -> E, LReLU,
      ConvTranspose 4x4 x2 -> E                                (full resolution again)
    block i (c = block_channels[i], s = scales[i]), on its input resized by 1/s:
      conv 3x3 /2 -> c/2, LReLU, conv 3x3 /2 -> c, LReLU,
      res_convs x [x -> LReLU(conv3x3(x) * beta + x)],
      ConvTranspose 4x4 x2 -> 4 * (5 + feature_channels), PixelShuffle(2)
      -> resized by s back to full size: flow (4, multiplied by s), mask logit (1), features
    block 0 input:  I0, I1, f0, f1, t                          (7 + 2E channels)
    block i > 0:    warp(I0), warp(I1), warp(f0), warp(f1), t, mask, features, flow / s
                    (the flow resized with the rest; 12 + 2E + feature_channels), and the
                    block's output flow is added to the previous one (residual refinement).

Every block also yields a merged frame (its warped frames blended by sigmoid(mask)),
returned by `IFNet.estimate`: RIFE's training loss is on the last one (plus a teacher's
distillation, which this module has no teacher for); training/vfi_train.py also puts
`block_weight` of it on the earlier ones in the teacher's place. The last block's is the
output. It is a convex combination of bilinear samples of the inputs, so it stays in
[0, 1] without clamping, as in Practical-RIFE's fast mode (the one the release uses).

Resizing is PyTorch's `F.interpolate(scale_factor=s, mode="bilinear", align_corners=False)`
(`resize_bilinear`: output floor(n * s), source coordinate (dst + 0.5) / s - 0.5 clamped at 0,
no antialiasing) and warping is `grid_sample(bilinear, padding_mode="border",
align_corners=True)` with the flow in pixels (`backward_warp`); both are plain jnp, so the
model is jittable and differentiable in the flows. Layout is NHWC throughout.

Inputs are zero-padded at the right/bottom to a multiple of `config.pad_multiple` (the
release needs multiples of 64; Practical-RIFE's video script pads to 128, as RELEASED does)
and every output is cropped back.

Logical axes as the VQGAN's (`sharding.VQGAN_RULES`): conv kernels (None, None, "conv_in",
"conv_out"), biases and the residual scales "conv_out"; feature maps pinned by `constrain`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from dithead_jax.config import IFNetConfig
from dithead_jax.models.layers import partitioned
from dithead_jax.models.vqgan import constrain, conv, torch_conv_init

# The architecture of Practical-RIFE 4.25 / 4.26's released flownet.pkl.
RELEASED = IFNetConfig()
# For 64x64 face crops trained from scratch on a CPU: three blocks (1/4, 1/2, 1).
DEMO = IFNetConfig(
    block_channels=(64, 48, 32),
    scales=(4, 2, 1),
    encoder_channels=8,
    feature_channels=8,
    res_convs=3,
    pad_multiple=16,
)
# Tiny, for tests: two blocks.
TESTING = IFNetConfig(
    block_channels=(16, 8),
    scales=(2, 1),
    encoder_channels=4,
    feature_channels=4,
    res_convs=1,
    pad_multiple=8,
)

_LEAKY_SLOPE = 0.2
_TORCH_PAD1 = ((1, 1), (1, 1))  # torch's padding=1 (SAME would pad (0, 1) at stride 2)


def leaky_relu(x: Array) -> Array:
    return jax.nn.leaky_relu(x, _LEAKY_SLOPE)


# ---------------------------------------------------------------------------------------
# Resampling (PyTorch semantics, pure jnp)
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _bilinear_taps(in_size: int, scale_factor: float) -> tuple[np.ndarray, ...]:
    """torch's 1-D bilinear resize (align_corners=False) by a given `scale_factor`: for each
    output position the two source indices and the weight of the second. torch maps with
    1 / scale_factor (not in / out) when a factor is given, in float32, as here."""
    out_size = int(np.floor(in_size * scale_factor))
    step = np.float32(1.0 / scale_factor)
    src = step * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
    for a in (lo, hi, frac):
        a.flags.writeable = False
    return lo, hi, frac


# Up to this many (out x in) weights per axis a resize is a matmul, whose gradient is a
# matmul too (gathers' is a scatter-add, ~5x slower than their forward on CPU: dense made
# the 64^2 DEMO train step ~15% faster). Above it, two gathers: a dense resize costs `in`
# multiply-adds per output, which at 256^2 would double the network's FLOPs.
_DENSE_RESIZE_LIMIT = 1 << 12


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(in_size: int, scale_factor: float) -> np.ndarray:
    """The same resize as an (in, out) matrix: two non-zero weights per column."""
    lo, hi, frac = _bilinear_taps(in_size, scale_factor)
    weights = np.zeros((in_size, lo.size), np.float32)
    np.add.at(weights, (lo, np.arange(lo.size)), np.float32(1) - frac)
    np.add.at(weights, (hi, np.arange(lo.size)), frac)
    weights.flags.writeable = False
    return weights


def _resize_axis(x: Array, axis: int, scale_factor: float) -> Array:
    lo, hi, frac = _bilinear_taps(x.shape[axis], scale_factor)
    if lo.size * x.shape[axis] <= _DENSE_RESIZE_LIMIT:
        weights = jnp.asarray(_bilinear_matrix(x.shape[axis], scale_factor), x.dtype)
        # Exact: the zero weights add nothing ("highest": no bf16/tf32 rounding).
        out = jnp.matmul(jnp.moveaxis(x, axis, -1), weights, precision="highest")
        return jnp.moveaxis(out, -1, axis)
    shape = [1] * x.ndim
    shape[axis] = frac.size
    frac = jnp.asarray(frac, x.dtype).reshape(shape)
    return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


def resize_bilinear(x: Float[Array, "b h w c"], scale_factor: float) -> Float[Array, "b ho wo c"]:
    """torch `F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)` on NHWC:
    output floor(h * s) x floor(w * s), no antialiasing. Along the width, then the height
    (torch's order of operations), each axis as a small matmul or, at video resolutions
    where a dense (out, in) matrix would dominate the cost, as two-tap gathers."""
    if scale_factor == 1:
        return x  # torch's taps are then the identity
    return _resize_axis(_resize_axis(x, 2, scale_factor), 1, scale_factor)


def backward_warp(
    image: Float[Array, "b h w c"], flow: Float[Array, "b h w 2"]
) -> Float[Array, "b h w c"]:
    """Output pixel (y, x) samples `image` at (y + flow_y, x + flow_x), bilinearly, with
    coordinates clamped to the image (border padding): RIFE's `warp`, i.e. `grid_sample`
    with align_corners=True, where the normalised grid is exactly the pixel grid.
    Coordinates and blending are float32 whatever the image dtype (bf16 cannot even hold
    pixel positions beyond 256 to a sub-pixel)."""
    b, h, w, c = image.shape
    flow = flow.astype(jnp.float32)
    x = jnp.arange(w, dtype=jnp.float32)[None, None, :] + flow[..., 0]
    y = jnp.arange(h, dtype=jnp.float32)[None, :, None] + flow[..., 1]
    x = jnp.clip(x, 0.0, w - 1.0)
    y = jnp.clip(y, 0.0, h - 1.0)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
    x1i, y1i = jnp.minimum(x0i + 1, w - 1), jnp.minimum(y0i + 1, h - 1)
    flat = image.reshape(b, h * w, c)

    def pick(yi: Array, xi: Array) -> Array:
        index = (yi * w + xi).reshape(b, h * w, 1)
        picked = jnp.take_along_axis(flat, index, axis=1).reshape(b, h, w, c)
        return picked.astype(jnp.float32)

    top = pick(y0i, x0i) * (1 - wx) + pick(y0i, x1i) * wx
    bottom = pick(y1i, x0i) * (1 - wx) + pick(y1i, x1i) * wx
    return (top * (1 - wy) + bottom * wy).astype(image.dtype)


def pixel_shuffle(x: Float[Array, "b h w cr"], factor: int) -> Float[Array, "b hr wr c"]:
    """torch `PixelShuffle` on NHWC: input channel c * r^2 + i * r + j -> out (r*h+i, r*w+j)."""
    b, h, w, channels = x.shape
    c = channels // (factor * factor)
    x = x.reshape(b, h, w, c, factor, factor)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * factor, w * factor, c)


def pad_to_multiple(x: Float[Array, "b h w c"], multiple: int) -> Float[Array, "b hp wp c"]:
    """Zero padding at the bottom and right up to the next multiple (torch `F.pad` as in
    Practical-RIFE's inference scripts)."""
    h, w = x.shape[1:3]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


def conv_transpose_x2(cin: int, cout: int, *, rngs: nnx.Rngs, **kw: Any) -> nnx.ConvTranspose:
    """torch `ConvTranspose2d(cin, cout, 4, stride=2, padding=1)`: exactly doubles h and w.

    As a conv over the 2x-dilated input with padding k - 1 - p = 2 on each side; the kernel
    is then torch's spatially flipped (the importer flips it)."""
    return nnx.ConvTranspose(
        cin,
        cout,
        kernel_size=(4, 4),
        strides=(2, 2),
        padding=((2, 2), (2, 2)),
        kernel_init=partitioned(torch_conv_init, (None, None, "conv_in", "conv_out")),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
        **kw,
    )


class Head(nnx.Module):
    """The frame encoder: 3 convs (the first stride 2) and a x2 transposed conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, **kw: Any):
        self.cnn0 = conv(3, channels, 3, stride=2, padding=_TORCH_PAD1, rngs=rngs, **kw)
        self.cnn1 = conv(channels, channels, 3, padding=_TORCH_PAD1, rngs=rngs, **kw)
        self.cnn2 = conv(channels, channels, 3, padding=_TORCH_PAD1, rngs=rngs, **kw)
        self.cnn3 = conv_transpose_x2(channels, channels, rngs=rngs, **kw)

    def __call__(self, x: Float[Array, "b h w 3"]) -> Float[Array, "b h w e"]:
        x = leaky_relu(self.cnn0(x))
        x = leaky_relu(self.cnn1(x))
        x = leaky_relu(self.cnn2(x))
        return constrain(self.cnn3(x))


class ResConv(nnx.Module):
    """x -> LeakyReLU(conv3x3(x) * beta + x), beta a learned per-channel scale (init 1)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, **kw: Any):
        self.conv = conv(channels, channels, 3, padding=_TORCH_PAD1, rngs=rngs, **kw)
        init = partitioned(nnx.initializers.ones_init(), ("conv_out",))
        self.beta = nnx.Param(init(rngs.params(), (channels,), kw["param_dtype"]))

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        return leaky_relu(self.conv(x) * self.beta[...].astype(x.dtype) + x)


class IFBlock(nnx.Module):
    """One coarse-to-fine level: (flow, mask logit, features) at full size from its input
    seen at 1 / scale (plus the previous flow, rescaled, for every block but the first)."""

    def __init__(
        self, in_channels: int, channels: int, cfg: IFNetConfig, *, rngs: nnx.Rngs, **kw: Any
    ):
        half = channels // 2
        self.conv0 = nnx.List(
            [
                conv(in_channels, half, 3, stride=2, padding=_TORCH_PAD1, rngs=rngs, **kw),
                conv(half, channels, 3, stride=2, padding=_TORCH_PAD1, rngs=rngs, **kw),
            ]
        )
        self.convblock = nnx.List(
            [ResConv(channels, rngs=rngs, **kw) for _ in range(cfg.res_convs)]
        )
        out = 4 * (5 + cfg.feature_channels)  # x4: PixelShuffle(2) folds it into space
        self.lastconv = conv_transpose_x2(channels, out, rngs=rngs, **kw)

    def __call__(
        self, x: Float[Array, "b h w cin"], flow: Float[Array, "b h w 4"] | None, scale: int
    ) -> tuple[Array, Array, Array]:
        x = resize_bilinear(x, 1.0 / scale)
        if flow is not None:
            # Flows are in pixels, so they shrink with the image.
            x = jnp.concatenate([x, resize_bilinear(flow, 1.0 / scale) / scale], axis=-1)
        h = constrain(x)
        for layer in self.conv0:
            h = constrain(leaky_relu(layer(h)))
        for layer in self.convblock:
            h = constrain(layer(h))
        out = resize_bilinear(pixel_shuffle(self.lastconv(h), 2), float(scale))
        # Flows stay float32 under a bf16 compute dtype: they accumulate over the blocks
        # and address pixels.
        return out[..., :4].astype(jnp.float32) * scale, out[..., 4:5], out[..., 5:]


class IFNet(nnx.Module):
    """Intermediate-frame estimation between img0 and img1 at time `timestep`.

    `IFNet(config, rngs=...)`; `model(img0, img1, t)` is the interpolated frame and
    `model.estimate(img0, img1, t)` everything RIFE's training losses need. Frames are
    (B, H, W, 3) floats in [0, 1] (RGB; the release was trained on RGB), any H and W.
    `timestep`: a float or a (B,) array (0 = img0, 1 = img1).
    """

    def __init__(self, config: IFNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        e = cfg.encoder_channels
        self.encode = Head(e, rngs=rngs, **kw)
        first = 3 + 3 + 2 * e + 1
        later = first + 1 + cfg.feature_channels + 4  # + mask, features, previous flow
        self.blocks = nnx.List(
            [
                IFBlock(first if i == 0 else later, c, cfg, rngs=rngs, **kw)
                for i, c in enumerate(cfg.block_channels)
            ]
        )

    def estimate(
        self,
        img0: Float[Array, "b h w 3"],
        img1: Float[Array, "b h w 3"],
        timestep: float | Float[Array, " b"] = 0.5,
    ) -> dict[str, Any]:
        """Every block's outputs, cropped to the input size:

        frame   (B, H, W, 3) the interpolated frame (the last block's merged frame)
        flows   per block (B, H, W, 4): F_t->0 (x, y) in pixels, then F_t->1
        masks   per block (B, H, W, 1): fusion weight of warped img0 (sigmoid of the logit)
        merged  per block (B, H, W, 3): warped frames blended by that block's mask
        warped  per block (warp(img0), warp(img1)), each (B, H, W, 3)
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if img0.shape != img1.shape or img0.ndim != 4 or img0.shape[-1] != 3:
            raise ValueError(f"expected two (B, H, W, 3) frames, got {img0.shape}, {img1.shape}")
        b, h, w, _ = img0.shape
        img0 = pad_to_multiple(constrain(img0.astype(dtype)), cfg.pad_multiple)
        img1 = pad_to_multiple(constrain(img1.astype(dtype)), cfg.pad_multiple)
        t = jnp.asarray(timestep, dtype)
        if t.ndim and t.size != b:
            raise ValueError(f"timestep must be a scalar or have one value per pair, got {t.shape}")
        t = jnp.broadcast_to(t.reshape(-1, 1, 1, 1), (b, *img0.shape[1:3], 1))
        f0, f1 = self.encode(img0), self.encode(img1)

        crop = lambda x: x[:, :h, :w]  # noqa: E731
        out: dict[str, Any] = {"flows": [], "masks": [], "merged": [], "warped": []}
        flow = mask = features = None
        warped0, warped1 = img0, img1
        for block, scale in zip(self.blocks, cfg.scales, strict=True):
            if flow is None:
                x = jnp.concatenate([img0, img1, f0, f1, t], axis=-1)
                flow, mask, features = block(x, None, scale)
            else:
                wf0 = backward_warp(f0, flow[..., :2])
                wf1 = backward_warp(f1, flow[..., 2:])
                x = jnp.concatenate([warped0, warped1, wf0, wf1, t, mask, features], axis=-1)
                delta, mask, features = block(x, flow, scale)
                flow = flow + delta
            warped0 = backward_warp(img0, flow[..., :2])
            warped1 = backward_warp(img1, flow[..., 2:])
            weight = jax.nn.sigmoid(mask)
            merged = warped0 * weight + warped1 * (1 - weight)
            out["flows"].append(crop(flow).astype(jnp.float32))
            out["masks"].append(crop(weight).astype(jnp.float32))
            out["merged"].append(crop(merged).astype(jnp.float32))
            out["warped"].append((crop(warped0), crop(warped1)))
        out["frame"] = out["merged"][-1]
        return out

    def __call__(
        self,
        img0: Float[Array, "b h w 3"],
        img1: Float[Array, "b h w 3"],
        timestep: float | Float[Array, " b"] = 0.5,
    ) -> Float[Array, "b h w 3"]:
        return self.estimate(img0, img1, timestep)["frame"]
