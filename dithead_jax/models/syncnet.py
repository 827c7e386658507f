"""SyncNet v2 (Chung & Zisserman 2016, joonson/syncnet_python `SyncNetModel.S`) in Flax NNX.

The lip-sync scorer behind LSE-C / LSE-D (Wav2Lip's evaluation, DiT-Head Table 1). Two
towers map 0.2 s of video and of audio to 1024-d embeddings whose Euclidean distance is
small when lips and speech are in sync:

    lips:  (b, 5, 224, 224, 3) BGR frames, raw 0..255 floats (cv2.imread, no normalisation)
           Conv3d 5x7x7 /(1,2,2) -> 96 -> BN, ReLU, MaxPool 1x3x3 /2      109 -> 54
           Conv3d 1x5x5 /2 pad 1 -> 256 -> BN, ReLU, MaxPool 1x3x3 /2 p1   26 -> 13
           3 x [Conv3d 1x3x3 pad 1 -> 256, BN, ReLU], MaxPool 1x3x3 /2     13 -> 6
           Conv3d 1x6x6 -> 512, BN, ReLU                                   6 -> 1
           Linear 512->512, BN1d, ReLU, Linear 512->1024
    audio: (b, 13, 20) MFCC (13 coefficients x 20 steps at 100 Hz), one input channel
           Conv2d 3x3 p1 -> 64, BN, ReLU, (MaxPool 1x1: identity)          13x20
           Conv2d 3x3 p1 -> 192, BN, ReLU, MaxPool 3x3 /(1,2)              -> 11x9
           Conv2d 3x3 p1 -> 384, 256, 256 (each BN, ReLU), MaxPool 3x3 /2  -> 5x4
           Conv2d 5x4 -> 512, BN, ReLU                                     -> 1x1
           Linear 512->512, BN1d, ReLU, Linear 512->1024

Inference only, so every BatchNorm (running statistics, eps 1e-5) is folded into the conv or
linear layer before it by the importer (`dithead_jax.convert.syncnet_weights`). The first
lip conv spans all 5 frames (its output has temporal size 1), so it is a 2-D conv whose
input channels are the 5 frames' 3 colours, frame-major (channel = 3 * t + c); every later
Conv3d/MaxPool3d has temporal extent 1 and is a plain 2-D op. Spatial layout is NHWC.

Weights are `Frozen` variables (as in `models/lpips.py`): optimisers never see them. A fresh
`SyncNet(rngs=...)` has random weights, scaled so embeddings are O(1) for inputs in the
ranges above; the pretrained network comes from `convert.syncnet_weights.load_syncnet()`.
A random network builds much faster as `syncnet_from_state_dict(random_state_dict())`
(numpy draws; jax.random compiles one sampler per weight shape, ~1 s each on a busy CPU).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dithead_jax.models.lpips import Frozen

LIP_FRAMES = 5  # video frames per window (0.2 s at 25 fps)
LIP_SIZE = 224  # face crops are resized to LIP_SIZE x LIP_SIZE
MFCC_COEFFS = 13
MFCC_STEPS = 20  # MFCC steps per window (0.2 s at 100 Hz)
FEATURE_DIM = 512  # conv trunk output (1x1 spatial) of both towers
EMBED_DIM = 1024  # `num_layers_in_fc_layers` in the original
BN_EPS = 1e-5  # torch BatchNorm default; the pickled weights do not store it


@dataclasses.dataclass(frozen=True)
class Pool:
    """torch MaxPool2d/3d (spatial part): kernel, stride, symmetric padding (-inf filled)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv + BN + ReLU (+ pool) group of a tower.

    torch_index: position of the conv in the original `nn.Sequential`; its BatchNorm is at
    torch_index + 1. torch_kernel: the original weight shape (O, I, [T,] kh, kw).
    """

    torch_index: int
    in_channels: int  # of the 2-D conv we run (first lip conv: 5 frames x 3 colours)
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    pool: Pool | None = None
    temporal: int | None = None  # Conv3d temporal kernel size, None for Conv2d

    @property
    def torch_kernel(self) -> tuple[int, ...]:
        if self.temporal is None:
            return (self.out_channels, self.in_channels, *self.kernel)
        return (self.out_channels, self.in_channels // self.temporal, self.temporal, *self.kernel)


_POOL_3X3_S2 = Pool((3, 3), (2, 2))

# `netcnnaud`. The MaxPool2d(1, 1) after the first conv is an identity and is left out.
AUDIO_CONVS: tuple[ConvSpec, ...] = (
    ConvSpec(0, 1, 64, (3, 3), padding=(1, 1)),
    ConvSpec(4, 64, 192, (3, 3), padding=(1, 1), pool=Pool((3, 3), (1, 2))),
    ConvSpec(8, 192, 384, (3, 3), padding=(1, 1)),
    ConvSpec(11, 384, 256, (3, 3), padding=(1, 1)),
    ConvSpec(14, 256, 256, (3, 3), padding=(1, 1), pool=_POOL_3X3_S2),
    ConvSpec(18, 256, 512, (5, 4)),
)

# `netcnnlip` (all Conv3d / MaxPool3d; only the first has a temporal extent > 1).
LIP_CONVS: tuple[ConvSpec, ...] = (
    ConvSpec(0, 3 * LIP_FRAMES, 96, (7, 7), (2, 2), pool=_POOL_3X3_S2, temporal=LIP_FRAMES),
    ConvSpec(4, 96, 256, (5, 5), (2, 2), (1, 1), pool=Pool((3, 3), (2, 2), (1, 1)), temporal=1),
    ConvSpec(8, 256, 256, (3, 3), padding=(1, 1), temporal=1),
    ConvSpec(11, 256, 256, (3, 3), padding=(1, 1), temporal=1),
    ConvSpec(14, 256, 256, (3, 3), padding=(1, 1), pool=_POOL_3X3_S2, temporal=1),
    ConvSpec(18, 256, 512, (6, 6), temporal=1),
)

# `netfcaud` / `netfclip`: Linear (index 0) + BN1d (1) + ReLU, then Linear (index 3).
FC_TORCH_INDICES = (0, 3)


class FrozenConv(nnx.Module):
    """2-D conv with bias (BatchNorm folded in), kernel HWIO, torch-style symmetric padding."""

    def __init__(self, spec: ConvSpec, *, input_scale: float = 1.0, rngs: nnx.Rngs):
        self.stride = spec.stride
        self.padding = tuple((p, p) for p in spec.padding)
        # Placeholder He-normal init; `input_scale` (typical input magnitude) keeps a random
        # network's activations O(1) on raw 0..255 pixels. Real use loads weights over it.
        fan_in = spec.kernel[0] * spec.kernel[1] * spec.in_channels
        std = (2.0 / fan_in) ** 0.5 / input_scale
        shape = (*spec.kernel, spec.in_channels, spec.out_channels)
        self.kernel = Frozen(std * jax.random.normal(rngs.params(), shape, jnp.float32))
        self.bias = Frozen(jnp.zeros((spec.out_channels,), jnp.float32))

    def __call__(
        self, x: Float[Array, "b h w cin"], dtype: jnp.dtype, precision: jax.lax.PrecisionLike
    ) -> Float[Array, "b ho wo cout"]:
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=self.stride,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
        return y + self.bias[...].astype(dtype)


class FrozenDense(nnx.Module):
    """Linear layer, kernel (in, out) (torch's weight transposed), BatchNorm folded in."""

    def __init__(self, in_features: int, out_features: int, *, gain: float = 1.0, rngs: nnx.Rngs):
        std = gain * (2.0 / in_features) ** 0.5
        shape = (in_features, out_features)
        self.kernel = Frozen(std * jax.random.normal(rngs.params(), shape, jnp.float32))
        self.bias = Frozen(jnp.zeros((out_features,), jnp.float32))

    def __call__(
        self, x: Float[Array, "b fin"], dtype: jnp.dtype, precision: jax.lax.PrecisionLike
    ) -> Float[Array, "b fout"]:
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype), precision=precision)
        return y + self.bias[...].astype(dtype)


def max_pool(x: Float[Array, "b h w c"], pool: Pool) -> Float[Array, "b ho wo c"]:
    """torch MaxPool (floor mode): padding counts as -inf, so it never wins."""
    padding = ((0, 0), *((p, p) for p in pool.padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, *pool.kernel, 1), (1, *pool.stride, 1), padding
    )


class Tower(nnx.Module):
    """Conv trunk (conv + ReLU [+ pool] groups) -> 512-d -> Linear, ReLU, Linear."""

    def __init__(
        self,
        convs: tuple[ConvSpec, ...],
        embed_dim: int,
        *,
        input_scale: float,
        rngs: nnx.Rngs,
    ):
        self.specs = convs
        self.convs = nnx.List(
            [
                FrozenConv(spec, input_scale=input_scale if i == 0 else 1.0, rngs=rngs)
                for i, spec in enumerate(convs)
            ]
        )
        self.fc = nnx.List(
            [
                FrozenDense(FEATURE_DIM, FEATURE_DIM, rngs=rngs),
                # Small last layer: a random network then has the real one's embedding
                # scale (~0.3 per element, distances ~5-15 as in published LSE-D values).
                FrozenDense(FEATURE_DIM, embed_dim, gain=0.15, rngs=rngs),
            ]
        )

    def features(
        self, x: Float[Array, "b h w c"], dtype: jnp.dtype, precision: jax.lax.PrecisionLike
    ) -> Float[Array, "b 512"]:
        for spec, conv in zip(self.specs, self.convs, strict=True):
            x = jax.nn.relu(conv(x, dtype, precision))
            if spec.pool is not None:
                x = max_pool(x, spec.pool)
        if x.shape[1:3] != (1, 1):
            raise ValueError(f"conv trunk ended at {x.shape[1:3]}, not 1x1: wrong input size")
        return x.reshape(x.shape[0], -1)

    def __call__(
        self, x: Float[Array, "b h w c"], dtype: jnp.dtype, precision: jax.lax.PrecisionLike
    ) -> Float[Array, "b e"]:
        h = jax.nn.relu(self.fc[0](self.features(x, dtype, precision), dtype, precision))
        return self.fc[1](h, dtype, precision).astype(jnp.float32)


def _fold_frames(frames: Float[Array, "b 5 h w 3"]) -> Float[Array, "b h w 15"]:
    """Frames into channels, frame-major (3 * t + c): how the importer flattens the first
    Conv3d's kernel, whose temporal extent covers the whole window."""
    b, t, h, w, c = frames.shape
    if (t, c) != (LIP_FRAMES, 3):
        raise ValueError(f"expected (b, {LIP_FRAMES}, H, W, 3) windows, got {frames.shape}")
    return jnp.transpose(frames, (0, 2, 3, 1, 4)).reshape(b, h, w, t * c)


class SyncNet(nnx.Module):
    """SyncNet v2: `embed_lips` (netcnnlip + netfclip) and `embed_audio` (netcnnaud + netfcaud).

    dtype: compute dtype of convs and linears (outputs are f32). precision: passed to them;
    use "highest" on TPU when the numbers must match the PyTorch reference.
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        embed_dim: int = EMBED_DIM,
        dtype: jnp.dtype = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
    ):
        self.dtype = dtype
        self.precision = precision
        self.embed_dim = embed_dim
        # Typical input magnitudes: pixels ~128, MFCCs ~10 (log energy of int16 audio ~20).
        self.lip = Tower(LIP_CONVS, embed_dim, input_scale=128.0, rngs=rngs)
        self.audio = Tower(AUDIO_CONVS, embed_dim, input_scale=10.0, rngs=rngs)

    def embed_lips(self, frames: Float[Array, "b 5 224 224 3"]) -> Float[Array, "b e"]:
        """Video windows: 5 consecutive BGR frames, values 0..255 (as cv2 reads them)."""
        return self.lip(_fold_frames(frames), self.dtype, self.precision)

    def embed_audio(self, mfcc: Float[Array, "b 13 20"]) -> Float[Array, "b e"]:
        """Audio windows: MFCC coefficients (rows) x 20 steps of 10 ms (columns)."""
        if mfcc.shape[1:] != (MFCC_COEFFS, MFCC_STEPS):
            raise ValueError(f"expected (b, 13, 20) MFCC windows, got {mfcc.shape}")
        return self.audio(mfcc[..., None], self.dtype, self.precision)

    def lip_features(self, frames: Float[Array, "b 5 224 224 3"]) -> Float[Array, "b 512"]:
        """The original's `forward_lipfeat`: the 512-d lip trunk output, before the FC head."""
        return self.lip.features(_fold_frames(frames), self.dtype, self.precision)
