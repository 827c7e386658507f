"""DiT-Head's denoiser: a DiT (Peebles & Xie, 2022) with audio cross-attention.

    eps = DiT(x, t, audio)
    x:     (B, H, W, 3*C)  channels-last concat [z_t, z_masked, z_reference] (C = 3 latents)
    t:     (B,)            diffusion timestep, int or float, in [0, T)
    audio: (B, 11, 33)     audio window x feature dim (Wav2Vec2 CTC logits per video frame)
    out:   (B, H, W, C)    epsilon (or v) prediction; (B, H, W, 2C) with learn_sigma

Options, off in the paper config: `null_audio` (a learned null context for
classifier-free guidance on audio; `drop_audio` selects it per example) and `audio_filter`
(DiffTalk's temporal filter: self-attention over the audio tokens before cross-attention),
`landmark_tokens` (DiffTalk's landmark condition: `landmarks` (B, n, 2) of the target frame
become one more cross-attention token after the audio context; CFG never drops it).

Pipeline: patchify conv -> + fixed 2-D sin-cos positions -> N x DiTBlock -> FinalLayer ->
unpatchify. Each block: adaLN-Zero self-attention, cross-attention to the audio context
(own LayerNorm, ungated, zero-initialised output projection), adaLN-Zero MLP. Because every
residual branch output starts at zero, a fresh model is exactly a fresh plain DiT, and its
output does not depend on the audio until training moves the cross-attention projection.

Context layouts (`DiTConfig.context_layout`), see DESIGN.md:
  "audio_tokens" (ours): 11 tokens, one per audio frame (Linear 33 -> D + learned position),
      then the timestep embedding as a 12th token: keys/values have width D.
  "single_token" (the paper read literally): Linear(363 -> D) of the flattened window,
      concatenated channel-wise with the timestep embedding: ONE token of width 2D. Softmax
      over a single key is 1, so cross-attention degenerates to a linear map of the context.

Logical axis vocabulary (names only; `dithead_jax/sharding.py` maps them to mesh axes).
Activations, pinned with `sharding.constrain` where the compiled program needs it (the
residual stream at every block's input and output, the timestep embedding, the audio
context, the adaLN parameters, q/k/v; tests/test_compiled_sharding.py):
  "activation_batch" examples; "activation_length" tokens; "activation_embed" the width D
  (kept whole); "activation_heads" / "activation_kv" heads and per-head features.
Parameters:
  "embed"    the model width D (projection inputs / outputs, modulation inputs)
  "mlp"      widths produced from D: MLP hidden, adaLN outputs (6D / 2D), timestep-MLP hidden
  "heads"    attention heads
  "kv"       per-head feature dimension (D / heads)
  "conv_in"  input channels of the patchify conv (the 9 latent channels)
  "conv_out" output channels of convs (unused by the DiT: its conv outputs "embed")
  "patch"    p*p*C_out outputs of the final projection (pixels of one output patch)
  "audio"    audio feature inputs (33 per frame, or 363 for the single-token layout)
  "norm"     LayerNorm scale and bias
  "layers"   the stacked-block axis, only with scan_layers=True
  None       never sharded: conv kernel taps, the q/k/v selector axis, the 256 sinusoid
             features of the timestep MLP, the 11 rows of the audio position table and of
             the null audio context (`null_audio`: (11 or 1, D) as (None, "embed")), the
             2n landmark coordinates entering `LandmarkEmbedder`.
Biases take the name of their output axis.

Parameter layouts differ from facebookresearch/DiT (a converter must reshape):
  attention projections keep heads apart, qkv kernel (D, 3, heads, kv), out (heads, kv, D);
  the patchify kernel is HWIO; with scan_layers=True all block parameters gain a leading
  (depth,) axis under `blocks` instead of `blocks/0 .. blocks/N-1` (`stack_blocks` and
  `unstack_blocks` convert pure-dict parameter trees between the two).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dithead_jax import sharding
from dithead_jax.config import CONDITION_LANDMARKS, DiTConfig
from dithead_jax.models.layers import (
    Attention,
    Mlp,
    TimestepEmbedder,
    linear,
    modulate,
    normal_002,
    ones,
    partitioned,
    remat_policy,
    sincos_2d,
    zeros,
)

Array = jax.Array

_NORM_EPS = 1e-6  # DiT's LayerNorm epsilon
# The residual stream (B, L, D): split by example, never by model width (see sharding.py).
TOKENS = ("activation_batch", "activation_length", "activation_embed")


def _per_example(v: Array) -> Array:
    """(B, k*D) adaLN parameters, whole per example. The modulation kernel's output is split
    over `tensor` ("mlp"); left so, cutting it into k chunks of D costs collective-permutes
    forward and all-to-alls backward (fsdp_tp), more than gathering B x k*D numbers once."""
    return sharding.constrain(v, ("activation_batch", "activation_embed"))


def _plain_norm(hidden_size: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm without scale or bias: adaLN supplies both."""
    return nnx.LayerNorm(
        hidden_size,
        epsilon=_NORM_EPS,
        use_scale=False,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """(B, H, W, C_in) -> (B, H/p * W/p, D) tokens in row-major order, by a p x p stride-p conv."""

    def __init__(self, cfg: DiTConfig, in_channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        # DiT initialises this conv like a Linear on the flattened patch: fan_in = p*p*C_in,
        # fan_out = D (a conv-style init would count the taps in fan_out too).
        init = nnx.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
        )
        self.proj = nnx.Conv(
            in_channels,
            cfg.hidden_size,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=partitioned(init, (None, None, "conv_in", "embed")),
            bias_init=partitioned(zeros, ("embed",)),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class AudioFilter(nnx.Module):
    """DiffTalk's temporal audio filter as a residual block: (B, W, D) audio tokens ->
    (B, W, D), each token attending to the whole window. Pre-LN, output projection at zero,
    so a fresh filter is the identity and a fresh model equals the unfiltered one."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(
            d,
            epsilon=_NORM_EPS,
            scale_init=partitioned(ones, ("norm",)),
            bias_init=partitioned(zeros, ("norm",)),
            **kw,
        )
        self.attn = Attention(
            d, cfg.num_heads, zero_init_output=True, implementation=cfg.attention_impl, **kw
        )

    def __call__(self, frames: Array) -> Array:
        return sharding.constrain(frames + self.attn(self.norm(frames)), TOKENS)


class AudioContextEmbedder(nnx.Module):
    """Audio window (B, 11, 33) + timestep embedding (B, D) -> cross-attention context.

    With `null_audio`, examples flagged in `drop_audio` (B,) get the learned `null_audio`
    in place of their embedded audio (the timestep part of the context stays). The null
    lives after the projection (and the filter), not as a raw (11, 33) input: a raw null
    reaches the keys only through the projection that carries real audio, so under
    "audio_tokens" its tokens would be confined to the 33-dim subspace real audio spans and
    tied to those weights; as an embedding it is free in all D dims for both layouts (as
    DiT's null class embedding is). Shape (tokens, D): tokens = window ("audio_tokens"), or
    1 ("single_token": the one projected window vector).
    """

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layout = cfg.context_layout
        self.dtype = dtype
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if self.layout == "audio_tokens":
            self.frame_proj = linear(cfg.audio_dim, d, ("audio", "embed"), **kw)
            pos_init = partitioned(normal_002, (None, "embed"))
            self.frame_pos = nnx.Param(pos_init(rngs.params(), (cfg.audio_window, d), param_dtype))
            self.context_size = d
            audio_tokens = cfg.audio_window
        elif self.layout == "single_token":
            window_features = cfg.audio_window * cfg.audio_dim
            self.window_proj = linear(window_features, d, ("audio", "embed"), **kw)
            self.context_size = 2 * d
            audio_tokens = 1
        else:
            raise ValueError(f"unknown context_layout {self.layout!r}")
        self.filter = AudioFilter(cfg, **kw) if cfg.audio_filter else None
        if cfg.null_audio:
            # Same init as frame_pos: a null as small as a position, not as the audio.
            null_init = partitioned(normal_002, (None, "embed"))
            self.null_audio = nnx.Param(null_init(rngs.params(), (audio_tokens, d), param_dtype))
        else:
            self.null_audio = None

    def __call__(self, audio: Array, c: Array, drop_audio: Array | None = None) -> Array:
        """audio: (B, window, dim), c: (B, D), drop_audio: (B,) bool or None
        -> (B, window + 1, D) or (B, 1, 2D)."""
        if drop_audio is not None and self.null_audio is None:
            raise ValueError("drop_audio needs a DiT built with DiTConfig.null_audio=True")
        # Pinned by example right after the projection, whose output is split like the
        # weight's "embed": later, the switch costs an all-to-all of (B, 11, D).
        if self.layout == "audio_tokens":
            frames = sharding.constrain(self.frame_proj(audio), TOKENS)
            frames = frames + self.frame_pos.value.astype(self.dtype or jnp.float32)
            if self.filter is not None:
                frames = self.filter(frames)
            frames = self._drop(frames, drop_audio)
            return jnp.concatenate([frames, c[:, None, :].astype(frames.dtype)], axis=1)
        a_h = _per_example(self.window_proj(audio.reshape(audio.shape[0], -1)))
        a_h = self._drop(a_h[:, None, :], drop_audio)[:, 0]
        return jnp.concatenate([a_h, c.astype(a_h.dtype)], axis=-1)[:, None, :]

    def _drop(self, embedded: Array, drop_audio: Array | None) -> Array:
        """embedded (B, tokens, D) with the flagged examples' rows replaced by the null."""
        if drop_audio is None:
            return embedded
        null = self.null_audio.value.astype(embedded.dtype)
        return jnp.where(drop_audio[:, None, None], null[None], embedded)


class LandmarkEmbedder(nnx.Module):
    """DiffTalk's landmark encoder E_L: (B, n, 2) landmarks in [0, 1] -> one (B, 1, width)
    cross-attention token. DiffTalk's LdmNet is a 3-layer MLP to a 64-dim feature that is
    concatenated with the audio feature; here a 2-layer SiLU MLP (the timestep MLP's shape)
    to the context width, appended as a token like the timestep's. One token for all points:
    the outline acts as one shape, and per-point tokens would add n keys to every block."""

    def __init__(self, cfg: DiTConfig, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(kernel_init=normal_002, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The 2n coordinates are few and never worth sharding: None.
        self.fc1 = linear(2 * len(CONDITION_LANDMARKS), d, (None, "mlp"), **kw)
        self.fc2 = linear(d, width, ("mlp", "embed"), **kw)

    def __call__(self, landmarks: Array) -> Array:
        """landmarks: (B, n, 2) -> (B, 1, width)."""
        # Centred on the crop: coordinates in [-1, 1] like the other inputs' scale.
        flat = (landmarks.reshape(landmarks.shape[0], -1) - 0.5) * 2.0
        # Pinned by example like the audio tokens it joins (unpinned, the fsdp presets
        # reshard it with an all-to-all).
        return sharding.constrain(self.fc2(nnx.silu(self.fc1(flat)))[:, None, :], TOKENS)


class DiTBlock(nnx.Module):
    """adaLN-Zero self-attention, cross-attention to the context, adaLN-Zero MLP."""

    def __init__(
        self, cfg: DiTConfig, context_size: int | None, *, dtype, param_dtype, rngs: nnx.Rngs
    ):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn_kw = dict(implementation=cfg.attention_impl, **kw)
        self.norm1 = _plain_norm(d, dtype, param_dtype, rngs)
        self.attn = Attention(d, cfg.num_heads, **attn_kw)
        if context_size is not None:
            # Not modulated by adaLN, so it keeps its own learned scale and bias.
            self.cross_norm = nnx.LayerNorm(
                d,
                epsilon=_NORM_EPS,
                scale_init=partitioned(ones, ("norm",)),
                bias_init=partitioned(zeros, ("norm",)),
                **kw,
            )
            self.cross_attn = Attention(
                d, cfg.num_heads, context_size, zero_init_output=True, **attn_kw
            )
        else:
            self.cross_norm = None
            self.cross_attn = None
        self.norm2 = _plain_norm(d, dtype, param_dtype, rngs)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), **kw)
        # adaLN-Zero: every gate starts at 0, so each block starts as the identity.
        self.modulation = linear(d, 6 * d, ("embed", "mlp"), kernel_init=zeros, **kw)

    def __call__(self, x: Array, c: Array, context: Array | None) -> Array:
        """x: (B, L, D) tokens, c: (B, D) timestep embedding, context: (B, S, C) or None."""
        x = sharding.constrain(x, TOKENS)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            _per_example(self.modulation(nnx.silu(c))), 6, axis=-1
        )
        x = x + gate_msa[:, None, :] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), context)
        x = x + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return sharding.constrain(x, TOKENS)


class FinalLayer(nnx.Module):
    """adaLN-modulated LayerNorm + Linear to p*p*C_out per token; both zero-initialised."""

    def __init__(self, cfg: DiTConfig, out_channels: int, *, dtype, param_dtype, rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        kw = dict(kernel_init=zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = _plain_norm(d, dtype, param_dtype, rngs)
        self.modulation = linear(d, 2 * d, ("embed", "mlp"), **kw)
        self.proj = linear(d, p * p * out_channels, ("embed", "patch"), **kw)

    def __call__(self, x: Array, c: Array) -> Array:
        shift, scale = jnp.split(_per_example(self.modulation(nnx.silu(c))), 2, axis=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class DiT(nnx.Module):
    """The DiT-Head denoiser; see the module docstring for shapes and options."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        if cfg.input_size % cfg.patch_size:
            raise ValueError(f"input_size {cfg.input_size} not divisible by {cfg.patch_size}")
        self.in_channels = 3 * cfg.latent_channels
        self.out_channels = cfg.latent_channels * (2 if cfg.learn_sigma else 1)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.patch_embed = PatchEmbed(cfg, self.in_channels, **kw)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, **kw)
        if cfg.cross_attention:
            self.context_embedder = AudioContextEmbedder(cfg, **kw)
            context_size = self.context_embedder.context_size
        else:
            self.context_embedder = None
            context_size = None
        self.landmark_embedder = (
            LandmarkEmbedder(cfg, context_size, **kw) if cfg.landmark_tokens else None
        )

        if cfg.scan_layers:
            # One DiTBlock with a leading (depth,) axis on every parameter, built by vmap so
            # each layer still gets its own random init; the forward pass scans over it.
            @nnx.split_rngs(splits=cfg.depth)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> DiTBlock:
                return DiTBlock(cfg, context_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([DiTBlock(cfg, context_size, **kw) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg, self.out_channels, **kw)

    def __call__(
        self,
        x: Array,
        t: Array,
        audio: Array | None = None,
        drop_audio: Array | None = None,
        *,
        landmarks: Array | None = None,
    ) -> Array:
        """x: (B, H, W, 3C), t: (B,), audio: (B, window, dim) -> (B, H, W, C_out) float32.

        drop_audio: (B,) bool, True where the example gets the learned null audio context
        instead of its audio (DiTConfig.null_audio; classifier-free guidance).
        landmarks: (B, n, 2) the target frame's CONDITION_LANDMARKS in [0, 1] crop
        coordinates (needed with DiTConfig.landmark_tokens, ignored without)."""
        cfg = self.config
        _, h, w, channels = x.shape
        if (h, w) != (cfg.input_size, cfg.input_size) or channels != self.in_channels:
            raise ValueError(
                f"expected (B, {cfg.input_size}, {cfg.input_size}, {self.in_channels}), "
                f"got {x.shape}"
            )
        compute_dtype = jnp.dtype(cfg.dtype)
        grid = cfg.input_size // cfg.patch_size

        tokens = self.patch_embed(x.astype(compute_dtype))
        tokens = tokens + jnp.asarray(sincos_2d(cfg.hidden_size, grid), compute_dtype)
        # Per-example vectors leave their projections split like the weights' "embed";
        # pinned by example, the adaLN and context paths need no all-to-all.
        c = sharding.constrain(self.t_embedder(t), ("activation_batch", "activation_embed"))
        context = None
        if self.context_embedder is not None:
            if audio is None:
                raise ValueError("this DiT has cross-attention and needs `audio`")
            context = self.context_embedder(audio.astype(compute_dtype), c, drop_audio)
            if self.landmark_embedder is not None:
                if landmarks is None:
                    raise ValueError("this DiT has landmark_tokens and needs `landmarks`")
                lm = self.landmark_embedder(landmarks.astype(compute_dtype))
                context = jnp.concatenate([context, lm.astype(context.dtype)], axis=1)
            context = sharding.constrain(context, TOKENS)
        tokens = self._run_blocks(tokens, c, context)
        patches = self.final_layer(tokens, c)  # (B, L, p*p*C_out)
        return unpatchify(patches, cfg.patch_size, grid, self.out_channels).astype(jnp.float32)

    def _run_blocks(self, x: Array, c: Array, context: Array | None) -> Array:
        cfg = self.config

        def apply_block(block: DiTBlock, x: Array, c: Array, context: Array | None) -> Array:
            return block(x, c, context)

        if cfg.remat_policy != "none":
            # Inside scan, CSE across iterations cannot happen, so the barrier is not needed.
            apply_block = nnx.remat(
                apply_block,
                policy=remat_policy(cfg.remat_policy),
                prevent_cse=not cfg.scan_layers,
            )
        if cfg.scan_layers:

            @nnx.scan(
                in_axes=(0, nnx.Carry, None, None),
                out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            def scan_blocks(block, x, c, context):
                return apply_block(block, x, c, context)

            return scan_blocks(self.blocks, x, c, context)
        for block in self.blocks:
            x = apply_block(block, x, c, context)
        return x


def unpatchify(patches: Array, patch_size: int, grid: int, channels: int) -> Array:
    """(B, grid*grid, p*p*C) with per-patch order (row, col, channel) -> (B, H, W, C)."""
    p = patch_size
    b = patches.shape[0]
    x = patches.reshape(b, grid, grid, p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, grid_h, p_row, grid_w, p_col, C)
    return x.reshape(b, grid * p, grid * p, channels)


def stack_blocks(params: dict) -> dict:
    """Pure-dict params (`nnx.to_pure_dict`) of a loop model -> the scan_layers layout."""
    blocks = params["blocks"]
    per_layer = [blocks[i] for i in sorted(blocks)]
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *per_layer)
    return {**params, "blocks": stacked}


def unstack_blocks(params: dict) -> dict:
    """Inverse of `stack_blocks`: scan_layers params -> `blocks/0 .. blocks/N-1`."""
    blocks = params["blocks"]
    depth = jax.tree.leaves(blocks)[0].shape[0]
    return {
        **params,
        "blocks": {i: jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(depth)},
    }
