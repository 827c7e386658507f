"""PatchGAN discriminator of the VQGAN (pix2pix / taming `NLayerDiscriminator`).

    x (B, H, W, 3) -> conv4x4/2, LeakyReLU(0.2)
                   -> (layers - 1) x [conv4x4/2, norm, LeakyReLU]      widths 2C, 4C, ... <= 8C
                   -> conv4x4/1, norm, LeakyReLU                        width min(2^layers, 8) C
                   -> conv4x4/1 -> (B, H', W', 1) real/fake logits, one per ~70px patch
All convs pad 1; the convs before a norm have no bias. 256^2 inputs give 30x30 logits.
Init as taming's `weights_init`: conv kernels N(0, 0.02), norm scale N(1, 0.02), bias 0.

Normalisation (`VQGANLossConfig.disc_norm`):
  "batch" (default): BatchNorm with *batch statistics on every call* and no running
      averages. taming only ever runs its discriminator in training mode, where BatchNorm2d
      normalises with the statistics of the current batch and the running averages are
      written but never read, so this is the same function -- without mutable state,
      which keeps the module a pure function of its `nnx.Param`s inside a jitted step.
      Like taming, real and fake images go through separate calls and so are normalised
      with separate statistics. Under a sharded jit the statistics are those of the global
      batch (SyncBatchNorm); taming with DDP used per-GPU batches.
  "group": GroupNorm(32), per-example and batch-size independent.
  "none":  no normalisation (the convs then keep their bias).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dithead_jax.models.layers import partitioned
from dithead_jax.models.vqgan import constrain, conv

Norm = Literal["batch", "group", "none"]
_BN_EPS = 1e-5  # torch BatchNorm2d


class BatchStatNorm(nnx.Module):
    """BatchNorm in training mode: normalise with the (N, H, W) statistics of this call."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        scale_init = lambda key, shape, dtype=jnp.float32: (
            1.0 + 0.02 * jax.random.normal(key, shape, dtype)
        )
        self.scale = nnx.Param(partitioned(scale_init, ("norm",))(rngs.params(), (channels,)))
        zeros = partitioned(nnx.initializers.zeros_init(), ("norm",))
        self.bias = nnx.Param(zeros(rngs.params(), (channels,)))

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))  # biased, as torch normalises
        y = (x32 - mean) * jax.lax.rsqrt(var + _BN_EPS) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def _norm(kind: Norm, channels: int, rngs: nnx.Rngs) -> nnx.Module | None:
    if kind == "batch":
        return BatchStatNorm(channels, rngs=rngs)
    if kind == "group":
        scale_init = lambda key, shape, dtype=jnp.float32: (
            1.0 + 0.02 * jax.random.normal(key, shape, dtype)
        )
        return nnx.GroupNorm(
            channels,
            num_groups=min(32, channels),
            epsilon=1e-5,
            scale_init=partitioned(scale_init, ("norm",)),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("norm",)),
            rngs=rngs,
        )
    if kind == "none":
        return None
    raise ValueError(f"unknown discriminator norm {kind!r}; use 'batch', 'group' or 'none'")


class NLayerDiscriminator(nnx.Module):
    """PatchGAN: images in [-1, 1] (B, H, W, C) -> logits (B, H', W', 1)."""

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        layers: int = 3,
        norm: Norm = "batch",
        *,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(stddev=0.02)
        use_bias = norm == "none"
        kw = dict(padding=((1, 1), (1, 1)), kernel_init=init, rngs=rngs)
        convs = [conv(in_channels, channels, 4, stride=2, **kw)]
        norms: list[nnx.Module | None] = [None]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last hidden layer keeps the resolution
            convs.append(conv(width, out, 4, stride=stride, use_bias=use_bias, **kw))
            norms.append(_norm(norm, out, rngs))
            width = out
        convs.append(conv(width, 1, 4, **kw))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b hp wp 1"]:
        h = constrain(x.astype(jnp.float32))
        for conv_layer, norm in zip(self.convs[:-1], self.norms, strict=True):
            h = conv_layer(h)
            if norm is not None:
                h = norm(h)
            h = constrain(jax.nn.leaky_relu(h, 0.2))
        return constrain(self.convs[-1](h))
