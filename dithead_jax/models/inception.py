"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, pool3 features) as a Flax NNX module.

FID is only comparable across papers when everybody uses the same network: the Inception-v3
graph of the original TF FID code (`inception-2015-12-05.tgz`), not torchvision's ImageNet
Inception. pytorch-fid ports it as torchvision's InceptionV3 with four patched blocks, and
this module reproduces that variant:

    stem      Conv2d_1a_3x3 (stride 2) .. Conv2d_4a_3x3, two 3x3/2 max-pools
    Mixed_5b/5c/5d   Inception A    3x3 avg-pool branch *excluding* padding from the count
    Mixed_6a         Inception B    (grid reduction, 3x3/2 max-pool branch)
    Mixed_6b..6e     Inception C    avg-pool branch excluding padding
    Mixed_7a         Inception D    (grid reduction)
    Mixed_7b         Inception E    avg-pool branch excluding padding
    Mixed_7c         Inception E    3x3/1 *max*-pool branch (a quirk of the TF graph)
    global mean over H, W -> pool3, 2048-d (the 8x8 map of a 299x299 input)

Every conv is conv (no bias) + BatchNorm (eps 0.001, running statistics) + ReLU; the
importers fold BatchNorm into the kernel and a bias, so one conv + bias + ReLU runs here.
Attribute names follow torchvision/pytorch-fid (`Mixed_5b.branch1x1`, ...), so a pytorch-fid
state_dict key `Mixed_5b.branch1x1.conv.weight` names the module `model.Mixed_5b.branch1x1`.

Input: NHWC in the network's input range, [-1, 1]. How images get there (resize, scaling)
is the FID *protocol*, defined and documented in `preprocess` below. Weights are `Frozen`
(not `nnx.Param`); a fresh module has random weights, load real ones with
`dithead_jax.convert.inception_weights.load_fid_inception()`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

from dithead_jax.models.lpips import Frozen

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # the TF graph's BatchNorm epsilon (pytorch-fid's BasicConv2d uses the same)

Protocol = Literal["pytorch-fid", "tf"]
PROTOCOLS: tuple[str, ...] = ("pytorch-fid", "tf")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _he_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """He-uniform placeholder weights, U(-a, a) with a = sqrt(6 / fan_in).

    Drawn by numpy when the key is concrete: eager `jax.random` compiles once per shape,
    and ~50 distinct conv shapes cost 100 s on a busy 2-core CPU. Under `nnx.eval_shape`
    (how the importers build the model) the key is a tracer and the jax draw is only traced
    (uniform: half the tracing cost of normal); nothing is computed.
    """
    bound = (6.0 / fan_in) ** 0.5
    try:
        seed = np.asarray(jax.random.key_data(key)).ravel()
    except jax.errors.TracerArrayConversionError:
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    draw = np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32)
    return jax.device_put(draw)  # jnp.asarray(numpy) compiles a program per shape


class ConvBN(nnx.Module):
    """Conv + (folded) inference BatchNorm + ReLU; kernel HWIO, torch-style symmetric padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        rngs: nnx.Rngs,
    ):
        kh, kw = _pair(kernel_size)
        ph, pw = _pair(padding)
        self.stride = stride
        self.padding = ((ph, ph), (pw, pw))
        # He init so a random network keeps O(1) activations through ~50 layers; real use
        # overwrites it.
        shape = (kh, kw, in_channels, out_channels)
        self.kernel = Frozen(_he_uniform(rngs.params(), shape, kh * kw * in_channels))
        self.bias = Frozen(jnp.zeros((out_channels,), jnp.float32))

    def __call__(
        self, x: Float[Array, "b h w cin"], precision: jax.lax.PrecisionLike = None
    ) -> Float[Array, "b ho wo cout"]:
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
        return jax.nn.relu(y + self.bias[...])


def max_pool_3x3(x: Float[Array, "b h w c"], stride: int, padding: int) -> jax.Array:
    """torch max_pool2d(3, stride, padding), floor mode; padding never wins (-inf)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad
    )


def avg_pool_3x3_exclude_pad(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """3x3/1 'same' average that divides by the number of real pixels in the window.

    torch's `avg_pool2d(3, 1, 1, count_include_pad=False)`, which is what TF's AvgPool with
    SAME padding computes: border outputs average 6 (edge) or 4 (corner) pixels, not 9.
    """
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)  # constant-folded under jit
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


class InceptionA(nnx.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1 (FIDInceptionA)."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = ConvBN(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = ConvBN(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
        p = precision
        b1 = self.branch1x1(x, p)
        b5 = self.branch5x5_2(self.branch5x5_1(x, p), p)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x), p)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # 64 + 64 + 96 + pool_features


class InceptionB(nnx.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1->3x3->3x3/2 | maxpool 3x3/2."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
        p = precision
        b3 = self.branch3x3(x, p)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
        return jnp.concatenate([b3, bd, max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convs (1x7 / 7x1) (FIDInceptionC)."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = ConvBN(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
        p = precision
        b1 = self.branch1x1(x, p)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x, p), p), p)
        bd = self.branch7x7dbl_1(x, p)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            bd = conv(bd, p)
        bd = self.branch7x7dbl_5(bd, p)
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x), p)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)  # 4 x 192 = 768


class InceptionD(nnx.Module):
    """17 -> 8 reduction: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool 3x3/2."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = ConvBN(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
        p = precision
        b3 = self.branch3x3_2(self.branch3x3_1(x, p), p)
        b7 = self.branch7x7x3_1(x, p)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7, p)
        return jnp.concatenate([b3, b7, max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3 / 3x1 heads. pool="avg" is FIDInceptionE_1 (Mixed_7b),
    pool="max" is FIDInceptionE_2 (Mixed_7c), whose TF graph max-pools in that branch."""

    def __init__(self, in_channels: int, pool: Literal["avg", "max"], *, rngs: nnx.Rngs):
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = ConvBN(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
        p = precision
        b1 = self.branch1x1(x, p)
        a = self.branch3x3_1(x, p)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p)
        pooled = max_pool_3x3(x, 1, 1) if self.pool == "max" else avg_pool_3x3_exclude_pad(x)
        outputs = [
            b1,
            self.branch3x3_2a(a, p),
            self.branch3x3_2b(a, p),
            self.branch3x3dbl_3a(d, p),
            self.branch3x3dbl_3b(d, p),
            self.branch_pool(pooled, p),
        ]
        return jnp.concatenate(outputs, axis=-1)  # 320 + 2*384 + 2*384 + 192 = 2048


class FIDInceptionV3(nnx.Module):
    """Inception-v3 of TF-FID up to pool3. Input (b, h, w, 3) in [-1, 1] (299x299 in FID).

    precision: passed to every conv. The default "highest" keeps f32 convs f32 on GPU/TPU
    (their default passes are TF32/bf16, which moves FID noticeably); on CPU it is free.
    """

    def __init__(self, *, rngs: nnx.Rngs, precision: jax.lax.PrecisionLike = "highest"):
        self.precision = precision
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)

    def __call__(self, x: Float[Array, "b h w 3"]) -> Float[Array, "b 2048"]:
        p = self.precision
        x = jnp.asarray(x, jnp.float32)
        x = self.Conv2d_1a_3x3(x, p)  # 299 -> 149
        x = self.Conv2d_2a_3x3(x, p)  # 147
        x = self.Conv2d_2b_3x3(x, p)  # 147
        x = max_pool_3x3(x, 2, 0)  # 73
        x = self.Conv2d_3b_1x1(x, p)
        x = self.Conv2d_4a_3x3(x, p)  # 71
        x = max_pool_3x3(x, 2, 0)  # 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x, p)  # -> 17x17x768
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a):
            x = block(x, p)  # -> 8x8x1280
        x = self.Mixed_7c(self.Mixed_7b(x, p), p)  # 8x8x2048
        # pool3: pytorch-fid's adaptive average pool to 1x1 (== the TF graph's 8x8 avg-pool
        # at 299x299 input).
        return jnp.mean(x, axis=(1, 2))


def conv_layers(model: FIDInceptionV3) -> dict[str, ConvBN]:
    """Every ConvBN by dotted path ("Conv2d_1a_3x3", "Mixed_5b.branch1x1", ...): 94 convs."""
    return {
        ".".join(str(part) for part in path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, ConvBN)
    }


# --------------------------------------------------------------------------- protocol
#
# FID feature protocol, from uint8 RGB frames (b, h, w, 3) to the network input (b, 299, 299,
# 3) in [-1, 1]. Two variants, both computed in float32 with *no* re-quantisation to uint8
# after resizing:
#
# "pytorch-fid" (default; what `pytorch_fid` does, and what the paper's numbers assume):
#   1. v = u8 / 255                                    (torchvision ToTensor)
#   2. bilinear resize to 299x299 as torch's F.interpolate(mode="bilinear",
#      align_corners=False, antialias=False): half-pixel centres, source coordinate
#      s = (d + 0.5) * in/out - 0.5 clamped at 0, two taps, edge index clamped; no low-pass
#      filter when shrinking. Identity when the frame is already 299x299.
#   3. x = 2 v - 1                                     -> [-1, 1]
#
# "tf" (the original TF FID graph; also fid-helper-pytorch's defaults, resample_mode
#   "nv_bilinear_float" + model_input_range (-1, 0.9921875)):
#   1. v = u8 / 255
#   2. bilinear resize as TF1's ResizeBilinear (align_corners=False, half_pixel_centers=
#      False): s = d * in/out, two taps, edge clamped (fid-helper's affine_grid/grid_sample
#      "nv_bilinear" reproduces exactly this mapping)
#   3. x = v * 255/128 - 1 = (u8 - 128) / 128, clamped to [-1, 127/128]
#
# Both resizes are separable, so they run as two small matrix products (exact, and fast on
# every backend) with HIGHEST precision so TPUs do not round the pixels to bf16.


def bilinear_resize_matrix(in_size: int, out_size: int, mode: Protocol) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with resized = M @ signal along one axis."""
    if mode not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {mode!r}; expected one of {PROTOCOLS}")
    # torch's CPU kernel: scale = float32(in) / out, then src = scale * (d + 0.5) - 0.5 as one
    # fused multiply-add rounded to float32 (float64 then one rounding reproduces it; plain
    # float32 steps put src 1 ulp off at a few columns).
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    if mode == "pytorch-fid":
        src = np.maximum((scale * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0))
    else:
        src = (dst * scale).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, i0), np.float32(1) - frac)
    np.add.at(matrix, (rows, i1), frac)
    return matrix


def preprocess(
    images: ArrayLike, protocol: Protocol = "pytorch-fid", size: int = INPUT_SIZE
) -> Float[Array, "b size size 3"]:
    """uint8 (or 0..255 float) frames (b, h, w, 3) -> network input per `protocol` (above)."""
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (b, h, w, 3) RGB frames, got shape {x.shape}")
    v = x.astype(jnp.float32) / 255.0
    rows = jnp.asarray(bilinear_resize_matrix(x.shape[1], size, protocol))
    cols = jnp.asarray(bilinear_resize_matrix(x.shape[2], size, protocol))
    hi = jax.lax.Precision.HIGHEST
    v = jnp.einsum("oh,bhwc->bowc", rows, v, precision=hi)
    v = jnp.einsum("pw,bowc->bopc", cols, v, precision=hi)
    if protocol == "pytorch-fid":
        return 2.0 * v - 1.0
    return jnp.clip(v * (255.0 / 128.0) - 1.0, -1.0, 127.0 / 128.0)
