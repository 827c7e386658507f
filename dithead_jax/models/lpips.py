"""LPIPS (Zhang et al. 2018), VGG16 trunk with the v0.1 linear heads, as a Flax NNX module.

Used twice: as the perceptual term of the VQGAN loss (differentiable w.r.t. the images, the
network itself frozen) and as the LPIPS evaluation metric. The computation follows the
original `lpips` package so that imported weights give the published numbers:

    x in [-1, 1] -> (x - shift) / scale                      ("ScalingLayer")
    VGG16 conv trunk, features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    each feature map: divide by its L2 norm over channels (per pixel)
    d_l = (f_l(x0) - f_l(x1))^2, weighted sum over channels (1x1 conv, no bias), mean over H, W
    LPIPS = sum over the five layers

Weights are `Frozen` variables, not `nnx.Param`, so optimizers and `nnx.grad` (which pick
`nnx.Param` by default) leave them alone even when this module sits inside a trained model.
Load them with `dithead_jax.convert.lpips_weights`; a fresh module has random weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

# The original ScalingLayer: maps [-1, 1] images to roughly ImageNet-normalised inputs.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# VGG16 conv widths per stage; a 2x2/2 max-pool precedes every stage but the first, and the
# last ReLU of each stage (relu1_2 ... relu5_3) is a feature tap.
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)
FEATURE_CHANNELS: tuple[int, ...] = tuple(stage[-1] for stage in VGG16_STAGES)


def torchvision_conv_indices() -> list[int]:
    """Index of each of the 13 convs in torchvision's `vgg16().features` Sequential.

    Every conv is followed by a ReLU, every stage after the first starts with a MaxPool:
    [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]. The `lpips` package keeps these
    indices inside its `net.slice{1..5}` submodules too.
    """
    indices, position = [], 0
    for stage_index, stage in enumerate(VGG16_STAGES):
        if stage_index > 0:
            position += 1  # the max-pool
        for _ in stage:
            indices.append(position)
            position += 2  # conv + relu
    return indices


class Frozen(nnx.Variable):
    """Pretrained weights that are loaded, never trained (not an `nnx.Param`)."""


class FrozenConv3x3(nnx.Module):
    """3x3 stride-1 'same' convolution with bias; kernel HWIO, as torch's padding=1."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        # Placeholder init (He normal) so a random LPIPS still produces finite, varied
        # features; real use loads pretrained weights over it. Plain (not truncated) normal:
        # eager truncated-normal sampling of 15M weights takes ~20 s on CPU.
        std = (2.0 / (9 * in_channels)) ** 0.5
        shape = (3, 3, in_channels, out_channels)
        self.kernel = Frozen(std * jax.random.normal(rngs.params(), shape, jnp.float32))
        self.bias = Frozen(jnp.zeros((out_channels,), jnp.float32))

    def __call__(
        self, x: Float[Array, "b h w cin"], dtype: jnp.dtype, precision: jax.lax.PrecisionLike
    ) -> Float[Array, "b h w cout"]:
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
        return y + self.bias[...].astype(dtype)


def _max_pool_2x2(x: Float[Array, "b h w c"]) -> Float[Array, "b h//2 w//2 c"]:
    # torch MaxPool2d(2, 2): floor mode, an odd last row/column is dropped.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG16Features(nnx.Module):
    """The 13-conv VGG16 trunk, returning the five stage outputs (after their last ReLU)."""

    def __init__(self, *, rngs: nnx.Rngs):
        convs, in_channels = [], 3
        for stage in VGG16_STAGES:
            for out_channels in stage:
                convs.append(FrozenConv3x3(in_channels, out_channels, rngs=rngs))
                in_channels = out_channels
        self.convs = nnx.List(convs)

    def __call__(
        self,
        x: Float[Array, "b h w 3"],
        dtype: jnp.dtype = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
    ) -> list[jax.Array]:
        features, conv_index = [], 0
        for stage_index, stage in enumerate(VGG16_STAGES):
            if stage_index > 0:
                x = _max_pool_2x2(x)
            for _ in stage:
                x = jax.nn.relu(self.convs[conv_index](x, dtype, precision))
                conv_index += 1
            features.append(x)  # (b, h / 2^s, w / 2^s, FEATURE_CHANNELS[s])
        return features


def _unit_normalize(f: Float[Array, "b h w c"], eps: float = 1e-10) -> jax.Array:
    # The original divides by (||f|| + eps). sqrt'(0) is infinite, so a pixel whose features
    # are all zero (easy after a ReLU) would give NaN gradients; adding eps^2 under the root
    # keeps the value (to ~1e-20) and makes the gradient finite.
    norm = jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + eps * eps)
    return f / (norm + eps)


class LPIPS(nnx.Module):
    """LPIPS distance between image batches in [-1, 1]; VGG16 trunk, v0.1 linear heads.

    dtype: compute dtype of the conv trunk (e.g. bfloat16); normalisation and the final
    sums run in f32. precision: passed to the convs; use "highest" on TPU for metric runs
    that must match the reference numbers. A fresh `LPIPS(rngs=...)` has random weights;
    get the pretrained network from `dithead_jax.convert.lpips_weights.load_lpips()`.
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
    ):
        self.dtype = dtype
        self.precision = precision
        self.vgg = VGG16Features(rngs=rngs)
        # One weight per channel and layer (the 1x1 convs of the original, without bias).
        # Random non-negative init: trained LPIPS heads are clamped to >= 0 as well.
        self.heads = nnx.List(
            [
                Frozen(jax.random.uniform(rngs.params(), (c,), jnp.float32) / c)
                for c in FEATURE_CHANNELS
            ]
        )

    def features(self, images: Float[Array, "b h w 3"]) -> list[jax.Array]:
        """Unit-normalised VGG features at the five taps (f32)."""
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        x = (jnp.asarray(images, jnp.float32) - shift) / scale
        taps = self.vgg(x, self.dtype, self.precision)
        return [_unit_normalize(f.astype(jnp.float32)) for f in taps]

    def layer_distances(
        self, images0: Float[Array, "b h w 3"], images1: Float[Array, "b h w 3"]
    ) -> Float[Array, "b 5"]:
        """Per-layer LPIPS terms (their sum over the last axis is the distance)."""
        # One trunk pass over both batches: half the kernel launches and better GEMM shapes.
        # Interleaved (x0[0], x1[0], x0[1], ...), not concatenated: with the batch split over
        # devices each device then holds both images of its own pairs, where a concat would
        # move half of every feature map between devices (collective-permutes).
        both = jnp.stack([jnp.asarray(images0), jnp.asarray(images1)], axis=1)
        both = both.reshape(-1, *both.shape[2:])
        terms = []
        for feature, head in zip(self.features(both), self.heads, strict=True):
            pairs = feature.reshape(-1, 2, *feature.shape[1:])
            diff = (pairs[:, 0] - pairs[:, 1]) ** 2
            weighted = jnp.einsum("bhwc,c->bhw", diff, head[...])
            terms.append(jnp.mean(weighted, axis=(1, 2)))
        return jnp.stack(terms, axis=-1)

    def __call__(
        self, images0: Float[Array, "b h w 3"], images1: Float[Array, "b h w 3"]
    ) -> Float[Array, " b"]:
        """LPIPS distance per image pair. Inputs NHWC in [-1, 1], H and W at least 16."""
        return jnp.sum(self.layer_distances(images0, images1), axis=-1)


def to_lpips_range(images: ArrayLike, data_range: float = 255.0) -> Float[Array, "..."]:
    """Map images with values in [0, data_range] (e.g. uint8) to LPIPS's [-1, 1] input."""
    return jnp.asarray(images, jnp.float32) * (2.0 / data_range) - 1.0
