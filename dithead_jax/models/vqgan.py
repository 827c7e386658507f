"""Stage-1 VQGAN (CompVis latent-diffusion `VQModel` layout) as a Flax NNX module.

    x (B, H, W, 3) in [-1, 1]
      -> Encoder -> (B, H/f, W/f, z_channels) -> quant_conv (1x1) -> z    (pre-quantisation)
      -> VectorQuantizer -> e (nearest codebook entry, straight-through gradient)
      -> post_quant_conv (1x1) -> Decoder -> x_rec (B, H, W, 3)

f = 2 ** (len(ch_mult) - 1). DiT-Head's diffusion runs on z (`VQGAN.encode`); `VQGAN.decode`
quantises first, like LDM's `VQModelInterface.decode`.

Encoder: conv_in 3x3 -> per level i: num_res_blocks ResnetBlocks (+ attention where the
level's resolution is in `attn_resolutions`), then a stride-2 3x3 conv with CompVis's
asymmetric zero pad (right/bottom only) on every level but the last -> middle (ResnetBlock,
self-attention, ResnetBlock) -> GroupNorm, swish, conv_out 3x3. The Decoder mirrors it with
num_res_blocks + 1 blocks per level and nearest-neighbour 2x upsampling + 3x3 conv.
ResnetBlock: GroupNorm, swish, conv3x3, GroupNorm, swish, (dropout), conv3x3, plus a 1x1
`nin_shortcut` when the width changes. AttnBlock: single-head softmax attention over all
H*W positions with 1x1-conv q/k/v/proj_out and a residual. GroupNorm eps 1e-6.

Module and attribute names mirror the PyTorch state_dict (`encoder.down.0.block.1.norm2`,
`decoder.mid.attn_1.q`, `quantize`, `quant_conv`, ...) so `convert/compvis_vqgan.py` maps
names one to one; kernels are HWIO where PyTorch has OIHW.

The quantiser's loss is ||sg(z) - e||^2 + beta * ||z - sg(e)||^2: beta on the commitment
term, as in the VQ-VAE paper. taming's `VectorQuantizer2(legacy=True)` (the default, used by
the published LDM checkpoints) puts beta on the codebook term instead; with beta = 0.25 that
makes the encoder commit 4x harder than intended and the codebook move 4x slower.

Logical axis vocabulary (mapped to mesh axes by `sharding.VQGAN_RULES`):
  "conv_in"       input channels of every convolution, 1x1 convs included
  "conv_out"      output channels of every convolution (and their biases)
  "norm"          GroupNorm / BatchNorm scale and bias
  "codebook"      codebook entries (16384)
  "codebook_dim"  width of a codebook entry (3)
  None            kernel taps (height, width) of 3x3 / 4x4 kernels
Feature maps are pinned to `ACTIVATION` ("activation_batch", ...) by `constrain`, which acts
only inside `nnx.logical_axis_rules(sharding.VQGAN_RULES)` on a mesh. The DiT's "embed"/
"mlp"/"heads"/"kv" are not used: the middle block's attention is built from 1x1
convolutions, so its projections are "conv_in" x "conv_out" like any other conv.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from dithead_jax import sharding
from dithead_jax.config import VQGANConfig
from dithead_jax.models.layers import partitioned

_GN_EPS = 1e-6  # CompVis `Normalize`
# Logical names of every feature map (B, H, W, C).
ACTIVATION = ("activation_batch", "activation_height", "activation_width", "activation_channels")
# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), ..).
torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def constrain(x: Array, names: tuple[str | None, ...] = ACTIVATION) -> Array:
    """Pin a feature map to its batch-split layout (`sharding.constrain`).

    Without it XLA's propagation, torn between batch-split activations and weights split
    over their output channels, shards some activations by channel and all-gathers whole
    batches. Acts only inside `nnx.logical_axis_rules(VQGAN_RULES)` (entered by the trainer
    around tracing) on a mesh; elsewhere it is the identity.
    """
    return sharding.constrain(x, names)


def conv(
    in_channels: int,
    out_channels: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: Any = "SAME",
    kernel_init: Any = torch_conv_init,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """HWIO conv with logical names (taps, taps, conv_in, conv_out); bias (conv_out,)."""
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        kernel_init=partitioned(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("conv_out",)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def group_norm(channels: int, groups: int, *, dtype, param_dtype, rngs) -> nnx.GroupNorm:
    # Two-pass variance: E[x^2] - E[x]^2 loses digits on the large early activations.
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=_GN_EPS,
        use_fast_variance=False,
        scale_init=partitioned(nnx.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("norm",)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class ResnetBlock(nnx.Module):
    """GN-swish-conv3x3-GN-swish-conv3x3 + (1x1 shortcut if the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, rngs, **kw):
        self.norm1 = group_norm(in_channels, groups, rngs=rngs, **kw)
        self.conv1 = conv(in_channels, out_channels, 3, rngs=rngs, **kw)
        self.norm2 = group_norm(out_channels, groups, rngs=rngs, **kw)
        self.conv2 = conv(out_channels, out_channels, 3, rngs=rngs, **kw)
        self.nin_shortcut = (
            conv(in_channels, out_channels, 1, rngs=rngs, **kw)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: Float[Array, "b h w cin"]) -> Float[Array, "b h w cout"]:
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = self.conv2(nnx.swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all H*W positions, 1x1-conv projections, residual."""

    def __init__(self, channels: int, groups: int, *, rngs, **kw):
        self.norm = group_norm(channels, groups, rngs=rngs, **kw)
        self.q = conv(channels, channels, 1, rngs=rngs, **kw)
        self.k = conv(channels, channels, 1, rngs=rngs, **kw)
        self.v = conv(channels, channels, 1, rngs=rngs, **kw)
        self.proj_out = conv(channels, channels, 1, rngs=rngs, **kw)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        b, height, width, c = x.shape
        h = self.norm(x)
        # (B, L, heads=1, C); jax's default scale 1/sqrt(C) is CompVis's c**-0.5. The XLA
        # path handles any C (cuDNN flash is limited to head dims <= 256; the f4 mid block
        # has 512).
        q, k, v = (p(h).reshape(b, height * width, 1, c) for p in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype))
        return x + self.proj_out(out.reshape(b, height, width, c))


class Downsample(nnx.Module):
    """Zero pad one row/column at the bottom/right, then a 3x3 stride-2 VALID conv (CompVis:
    torch has no asymmetric conv padding, so the pad is explicit)."""

    def __init__(self, channels: int, *, rngs, **kw):
        self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, **kw)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h/2 w/2 c"]:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int, *, rngs, **kw):
        self.conv = conv(channels, channels, 3, rngs=rngs, **kw)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b 2h 2w c"]:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution: `block` res blocks, `attn` (one per block or none), then a resampler
    (`downsample` in the encoder, `upsample` in the decoder, or neither)."""

    def __init__(self, blocks: list, attns: list, resample: nnx.Module | None, kind: str):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        self.downsample = resample if kind == "down" else None
        self.upsample = resample if kind == "up" else None

    def __call__(self, x: Array) -> Array:
        for i, block in enumerate(self.block):
            x = constrain(block(x))
            if len(self.attn):
                x = constrain(self.attn[i](x))
        if self.downsample is not None:
            x = constrain(self.downsample(x))
        if self.upsample is not None:
            x = constrain(self.upsample(x))
        return x


class Middle(nnx.Module):
    def __init__(self, channels: int, cfg: VQGANConfig, *, rngs, **kw):
        groups = cfg.norm_groups
        self.block_1 = ResnetBlock(channels, channels, groups, rngs=rngs, **kw)
        self.attn_1 = AttnBlock(channels, groups, rngs=rngs, **kw) if cfg.mid_attention else None
        self.block_2 = ResnetBlock(channels, channels, groups, rngs=rngs, **kw)

    def __call__(self, x: Array) -> Array:
        x = constrain(self.block_1(x))
        if self.attn_1 is not None:
            x = constrain(self.attn_1(x))
        return constrain(self.block_2(x))


def _has_attention(cfg: VQGANConfig, level: int) -> bool:
    return cfg.resolution // 2**level in cfg.attn_resolutions


class Encoder(nnx.Module):
    """(B, H, W, in_channels) -> (B, H/f, W/f, z_channels)."""

    def __init__(self, cfg: VQGANConfig, *, rngs, **kw):
        if cfg.dropout:
            raise NotImplementedError("VQGAN dropout > 0 is not implemented (CompVis uses 0)")
        g, num_levels = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = conv(cfg.in_channels, cfg.ch, 3, rngs=rngs, **kw)
        levels, block_in = [], cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, g, rngs=rngs, **kw))
                block_in = block_out
                if _has_attention(cfg, i):
                    attns.append(AttnBlock(block_in, g, rngs=rngs, **kw))
            down = Downsample(block_in, rngs=rngs, **kw) if i != num_levels - 1 else None
            levels.append(Level(blocks, attns, down, "down"))
        self.down = nnx.List(levels)
        self.mid = Middle(block_in, cfg, rngs=rngs, **kw)
        self.norm_out = group_norm(block_in, g, rngs=rngs, **kw)
        self.conv_out = conv(block_in, cfg.z_channels, 3, rngs=rngs, **kw)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b hf wf z"]:
        h = constrain(self.conv_in(constrain(x)))
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return constrain(self.conv_out(nnx.swish(self.norm_out(h))))


class Decoder(nnx.Module):
    """(B, h, w, z_channels) -> (B, h*f, w*f, out_channels).

    `features` stops before `conv_out` so the loss can differentiate the last layer on its
    own (the adaptive GAN weight needs gradients w.r.t. `conv_out.kernel` only)."""

    def __init__(self, cfg: VQGANConfig, *, rngs, **kw):
        g, num_levels = cfg.norm_groups, len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv(cfg.z_channels, block_in, 3, rngs=rngs, **kw)
        self.mid = Middle(block_in, cfg, rngs=rngs, **kw)
        levels: list[Level] = []
        for i in reversed(range(num_levels)):  # built top-down, stored in level order
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, g, rngs=rngs, **kw))
                block_in = block_out
                if _has_attention(cfg, i):
                    attns.append(AttnBlock(block_in, g, rngs=rngs, **kw))
            up = Upsample(block_in, rngs=rngs, **kw) if i != 0 else None
            levels.insert(0, Level(blocks, attns, up, "up"))
        self.up = nnx.List(levels)
        self.norm_out = group_norm(block_in, g, rngs=rngs, **kw)
        self.conv_out = conv(block_in, cfg.out_channels, 3, rngs=rngs, **kw)

    def features(self, z: Float[Array, "b h w z"]) -> Float[Array, "b H W c"]:
        """Everything up to the input of `conv_out` (after the last GroupNorm + swish)."""
        h = self.mid(constrain(self.conv_in(constrain(z))))
        for level in reversed(self.up):
            h = level(h)
        return constrain(nnx.swish(self.norm_out(h)))

    def __call__(self, z: Float[Array, "b h w z"]) -> Float[Array, "b H W c"]:
        return constrain(self.conv_out(self.features(z)))


# ---------------------------------------------------------------------------------------
# Vector quantisation


@struct.dataclass
class QuantizerOutput:
    """What the quantiser reports besides the quantised latent (all float32 scalars but
    `indices`). `loss` = codebook_loss + beta * commitment_loss."""

    loss: jax.Array
    codebook_loss: jax.Array  # ||sg(z) - e||^2, moves the codebook
    commitment_loss: jax.Array  # ||z - sg(e)||^2, moves the encoder
    indices: jax.Array  # (B, h, w) int32
    perplexity: jax.Array  # exp(entropy of the batch's code histogram)
    usage: jax.Array  # fraction of the codebook used in this batch


def nearest_codes(
    z: Float[Array, "b h w d"], codebook: Float[Array, "k d"], max_elements: int = 2**26
) -> Int[Array, "b h w"]:
    """Index of the nearest codebook entry (squared Euclidean) for every latent vector.

    Distances are explicit sums of squared differences in float32: with 3-dim codes that is
    as cheap as the |z|^2 - 2 z.e + |e|^2 matmul form, exact on TPUs (whose default f32
    matmul precision would round the dot product to bf16), and never cancels. The (N, K)
    distance table is built a few latent rows at a time (`lax.map` over H) so that 16384
    codes x a batch of 64x64 latents never has to sit in memory at once.
    """
    z = jax.lax.stop_gradient(z).astype(jnp.float32)
    codebook = jax.lax.stop_gradient(codebook).astype(jnp.float32)
    b, h, w, _ = z.shape

    def search(rows: Float[Array, "... d"]) -> Int[Array, "..."]:
        distances = jnp.sum(jnp.square(rows[..., None, :] - codebook), axis=-1)
        return jnp.argmin(distances, axis=-1).astype(jnp.int32)

    rows_per_chunk = max(1, max_elements // max(1, b * w * codebook.shape[0]))
    if rows_per_chunk >= h:
        return search(z)
    per_row = jax.lax.map(search, jnp.moveaxis(z, 1, 0), batch_size=rows_per_chunk)
    return jnp.moveaxis(per_row, 0, 1)


def code_counts(indices: Int[Array, "..."], num_codes: int) -> Int[Array, " k"]:
    """How often each code was picked (histogram over all positions of the batch)."""
    return jnp.bincount(indices.reshape(-1), length=num_codes).astype(jnp.int32)


def usage_stats(counts: Int[Array, " k"]) -> tuple[jax.Array, jax.Array]:
    """(perplexity, fraction of codes used) of a code histogram. Perplexity is the
    effective number of codes in use: K if all are equally frequent, 1 if one code wins."""
    p = counts.astype(jnp.float32) / jnp.maximum(jnp.sum(counts), 1)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


class VectorQuantizer(nnx.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    Forward value is the codebook entry e; the gradient w.r.t. z is the identity (z + sg(e-z)).
    The codebook only learns through `QuantizerOutput.codebook_loss`.
    """

    def __init__(self, num_codes: int, dim: int, beta: float, *, param_dtype, rngs: nnx.Rngs):
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        # taming's init: U(-1/K, 1/K). All codes start near 0; `reset_dead_codes` spreads
        # them over the encoder's output distribution once training starts.
        init = nnx.initializers.uniform(2.0 / num_codes)
        shifted = lambda key, shape, dtype: init(key, shape, dtype) - 1.0 / num_codes
        self.codebook = nnx.Param(
            partitioned(shifted, ("codebook", "codebook_dim"))(
                rngs.params(), (num_codes, dim), param_dtype
            )
        )

    def embed(self, indices: Int[Array, "..."]) -> Float[Array, "... d"]:
        return jnp.take(self.codebook[...], indices, axis=0)

    def __call__(self, z: Float[Array, "b h w d"]) -> tuple[Array, QuantizerOutput]:
        """z: pre-quantisation latent -> (straight-through quantised latent, report)."""
        indices = nearest_codes(z, self.codebook[...])
        e = self.embed(indices).astype(z.dtype)
        z32, e32 = z.astype(jnp.float32), e.astype(jnp.float32)
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z32) - e32))
        commitment_loss = jnp.mean(jnp.square(z32 - jax.lax.stop_gradient(e32)))
        perplexity, usage = usage_stats(code_counts(indices, self.num_codes))
        report = QuantizerOutput(
            loss=codebook_loss + self.beta * commitment_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            indices=indices,
            perplexity=perplexity,
            usage=usage,
        )
        return z + jax.lax.stop_gradient(e - z), report


# ---------------------------------------------------------------------------------------
# Dead codes (pure functions the train step calls; the age array lives in the train loop)


def update_code_age(age: Int[Array, " k"], counts: Int[Array, " k"]) -> Int[Array, " k"]:
    """Steps since each code was last picked: 0 where used in this batch, else +1."""
    return jnp.where(counts > 0, 0, age + 1).astype(age.dtype)


def reset_dead_codes(
    codebook: Float[Array, "k d"],
    age: Int[Array, " k"],
    latents: Float[Array, "... d"],
    key: jax.Array,
    max_age: int,
) -> tuple[Array, Array, Array]:
    """Re-initialise every code unused for `max_age` steps to a random pre-quantisation
    latent of the current batch (drawn uniformly with replacement over all positions).

    Returns (codebook, age with the reset codes at 0, number of codes reset). A reset code
    lands where the encoder's outputs actually are, so it is picked again at once; codes in
    use are untouched. The optimiser's moments for reset rows are left as they are (Adam's
    beta1 = 0.5 forgets them within a few steps). With max_age <= 0 nothing is reset.
    """
    flat = jax.lax.stop_gradient(latents).reshape(-1, codebook.shape[-1])
    dead = (age >= max_age) & (max_age > 0)
    picks = jax.random.randint(key, (codebook.shape[0],), 0, flat.shape[0])
    candidates = jnp.take(flat, picks, axis=0).astype(codebook.dtype)
    new_codebook = jnp.where(dead[:, None], candidates, codebook)
    return new_codebook, jnp.where(dead, 0, age), jnp.sum(dead.astype(jnp.int32))


def refresh_codebook(
    codebook: Float[Array, "k d"],
    age: Int[Array, " k"],
    indices: Int[Array, "..."],
    latents: Float[Array, "... d"],
    key: jax.Array,
    max_age: int,
) -> tuple[Array, Array, Array]:
    """One step of codebook upkeep after the optimiser update: age the codes by this
    batch's `indices`, then `reset_dead_codes`. Start with `age = jnp.zeros(K, int32)`.
    Returns (codebook, age, number of codes reset)."""
    age = update_code_age(age, code_counts(indices, codebook.shape[0]))
    return reset_dead_codes(codebook, age, latents, key, max_age)


# ---------------------------------------------------------------------------------------
# The model


class VQGAN(nnx.Module):
    """Encoder, quant_conv, VectorQuantizer, post_quant_conv, Decoder (see module doc)."""

    def __init__(self, config: VQGANConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.encoder = Encoder(cfg, rngs=rngs, **kw)
        self.decoder = Decoder(cfg, rngs=rngs, **kw)
        self.quant_conv = conv(cfg.z_channels, cfg.embed_dim, 1, rngs=rngs, **kw)
        self.post_quant_conv = conv(cfg.embed_dim, cfg.z_channels, 1, rngs=rngs, **kw)
        self.quantize = VectorQuantizer(
            cfg.codebook_size,
            cfg.embed_dim,
            cfg.commitment_beta,
            param_dtype=kw["param_dtype"],
            rngs=rngs,
        )

    def encode(self, x: Float[Array, "b H W c"]) -> Float[Array, "b h w d"]:
        """Pre-quantisation latent (output of quant_conv), float32: what the DiT diffuses."""
        if x.shape[1] % self.config.downsample_factor or x.shape[2] % self.config.downsample_factor:
            raise ValueError(
                f"image size {x.shape[1:3]} not divisible by f={self.config.downsample_factor}"
            )
        z = self.quant_conv(self.encoder(x.astype(self.config.dtype)))
        return z.astype(jnp.float32)

    def decode_features(
        self, z: Float[Array, "b h w d"], quantize: bool = True
    ) -> tuple[Array, QuantizerOutput | None]:
        """Quantise (unless told not to) and run the decoder up to its last conv."""
        report = None
        if quantize:
            z, report = self.quantize(z)
        h = self.decoder.features(self.post_quant_conv(z.astype(self.config.dtype)))
        return h, report

    def decode(self, z: Float[Array, "b h w d"], quantize: bool = True) -> Float[Array, "b H W c"]:
        """Latent -> image (float32). quantize=False decodes z as given (LDM's
        `force_not_quantize`)."""
        h, _ = self.decode_features(z, quantize)
        return constrain(self.decoder.conv_out(h)).astype(jnp.float32)

    def decode_code(self, indices: Int[Array, "b h w"]) -> Float[Array, "b H W c"]:
        return self.decode(self.quantize.embed(indices), quantize=False)

    def __call__(self, x: Float[Array, "b H W c"]) -> tuple[Array, QuantizerOutput, Array]:
        """x -> (reconstruction float32, quantiser report, pre-quantisation latent z)."""
        z = self.encode(x)
        h, report = self.decode_features(z)
        return constrain(self.decoder.conv_out(h)).astype(jnp.float32), report, z
