"""Wav2Vec2 with a CTC head in Flax NNX, numerically matching Hugging Face's `Wav2Vec2ForCTC`.

DiT-Head conditions on the CTC logits of `wav2vec2-large-xlsr-53-english` (vocabulary 33,
50 frames per second). transformers 5 has no Flax models, so this is our own port; the
loader in `dithead_jax/convert/hf_wav2vec2.py` reads HF checkpoints into it.

Both published layouts are covered:

- "base" (wav2vec2-base*): `feat_extract_norm="group"` (GroupNorm on the first conv only),
  post-LN transformer (`do_stable_layer_norm=False`), encoder LayerNorm before the layers.
- "large-lv60 / xlsr": `feat_extract_norm="layer"` (LayerNorm after every conv), pre-LN
  transformer (`do_stable_layer_norm=True`), encoder LayerNorm after the layers.

Attribute names mirror the PyTorch module tree (`wav2vec2.encoder.layers.3.attention.q_proj`)
so that checkpoint keys map onto parameter paths mechanically. Inference only: dropout,
LayerDrop, SpecAugment and the padding attention mask are left out (DiT-Head runs the model
frozen on equal-length clips).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

# torch.nn.LayerNorm / GroupNorm defaults; HF builds the feature-encoder norms without
# passing `layer_norm_eps`, so they keep this value whatever the config says.
_TORCH_NORM_EPS = 1e-5

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # HF's "gelu" is the exact erf form; the tanh forms have their own names.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function HF's `ACT2FN[name]` stands for."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported Wav2Vec2 activation {name!r}; known: {sorted(_ACTIVATIONS)}"
        ) from None


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """The subset of HF's `Wav2Vec2Config` that inference needs (same field names).

    Defaults are wav2vec2-base; `xlsr53_large()` gives the model DiT-Head uses.
    """

    vocab_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: Literal["group", "layer"] = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False

    def __post_init__(self) -> None:
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(
                f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}"
            )
        if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel):
            raise ValueError("conv_dim, conv_stride and conv_kernel must have the same length")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")

    @classmethod
    def from_hf(cls, hf_config: Any) -> Wav2Vec2Config:
        """Takes the fields we need from a `transformers.Wav2Vec2Config` (or any object with them).

        Checkpoints with adapters (MMS language adapters, `add_adapter`) change the graph in
        ways this port does not implement, so they are refused rather than silently dropped.
        """
        if getattr(hf_config, "add_adapter", False):
            raise NotImplementedError(
                "Wav2Vec2 checkpoints with `add_adapter=True` are not supported"
            )
        if getattr(hf_config, "adapter_attn_dim", None) is not None:
            raise NotImplementedError(
                "Wav2Vec2 checkpoints with attention adapters are not supported"
            )
        values = {}
        for field in dataclasses.fields(cls):
            value = getattr(hf_config, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    @classmethod
    def xlsr53_large(cls, vocab_size: int = 33) -> Wav2Vec2Config:
        """The architecture of `wav2vec2-large-xlsr-53-english` (the paper's audio encoder)."""
        return cls(
            vocab_size=vocab_size,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            feat_extract_norm="layer",
            conv_bias=True,
            do_stable_layer_norm=True,
        )


class _ConvGeometry(Protocol):
    conv_kernel: Sequence[int]
    conv_stride: Sequence[int]


def output_frames(num_samples: int, config: _ConvGeometry) -> int:
    """Number of frames the conv stack yields for `num_samples` input samples.

    Unpadded convolutions chained: n -> floor((n - k) / s) + 1 per layer. For the standard
    stack this equals floor((n - 400) / 320) + 1 (16000 samples -> 49 frames, not 50), so
    frame i covers samples [320 i, 320 i + 400). Returns 0 when the input is shorter than the
    receptive field (PyTorch would raise there). Works with our config or HF's.
    """
    n = int(num_samples)
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        if n < kernel:
            return 0
        n = (n - kernel) // stride + 1
    return n


def frame_geometry(config: _ConvGeometry) -> tuple[int, int]:
    """(receptive_field, hop) of the conv stack in samples: (400, 320) for the standard one.

    Frame i of the output covers input samples [hop * i, hop * i + receptive_field), so its
    centre lies at hop * i + receptive_field / 2 (12.5 ms + 20 ms * i at 16 kHz).
    """
    receptive, hop = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        receptive += (kernel - 1) * hop
        hop *= stride
    return receptive, hop


class FeatureEncoderConvLayer(nnx.Module):
    """One strided conv of the waveform encoder, optionally normalised, then activated.

    x: (B, T_in, C_in) -> (B, T_out, C_out), T_out = floor((T_in - k) / s) + 1.
    """

    def __init__(
        self,
        config: Wav2Vec2Config,
        layer_id: int,
        norm: Literal["group", "layer"] | None,
        *,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        in_dim = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_dim = config.conv_dim[layer_id]
        self.conv = nnx.Conv(
            in_dim,
            out_dim,
            kernel_size=config.conv_kernel[layer_id],
            strides=config.conv_stride[layer_id],
            padding="VALID",
            use_bias=config.conv_bias,
            dtype=dtype,
            rngs=rngs,
        )
        # Two-pass variance: the first conv sees 16k+ samples per channel, where the fast
        # E[x^2] - E[x]^2 form loses digits against PyTorch.
        if norm == "layer":
            self.layer_norm = nnx.LayerNorm(
                out_dim, epsilon=_TORCH_NORM_EPS, use_fast_variance=False, dtype=dtype, rngs=rngs
            )
        elif norm == "group":
            # One group per channel: each channel is normalised over time (instance norm).
            self.layer_norm = nnx.GroupNorm(
                out_dim,
                num_groups=out_dim,
                epsilon=_TORCH_NORM_EPS,
                use_fast_variance=False,
                dtype=dtype,
                rngs=rngs,
            )
        else:
            self.layer_norm = None
        self.activation = activation(config.feat_extract_activation)

    def __call__(self, x: Array) -> Array:
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.activation(x)


class FeatureEncoder(nnx.Module):
    """Waveform -> 50 Hz features. x: (B, N) -> (B, output_frames(N), conv_dim[-1])."""

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        layers = []
        for i in range(len(config.conv_dim)):
            # "group": only the first conv is normalised; "layer": every conv is.
            norms = {"layer": "layer", "group": "group" if i == 0 else None}
            norm = norms[config.feat_extract_norm]
            layers.append(FeatureEncoderConvLayer(config, i, norm, dtype=dtype, rngs=rngs))
        self.conv_layers = nnx.List(layers)

    def __call__(self, waveform: Array) -> Array:
        x = waveform[..., None]  # channels-last, one input channel
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nnx.Module):
    """LayerNorm + Linear from conv features to the transformer width. (B, T, C) -> (B, T, D)."""

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        conv_out = config.conv_dim[-1]
        self.layer_norm = nnx.LayerNorm(
            conv_out, epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype, rngs=rngs
        )
        self.projection = nnx.Linear(conv_out, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.projection(self.layer_norm(x))


class PositionalConvEmbedding(nnx.Module):
    """Relative position signal: a wide grouped conv over time. (B, T, D) -> (B, T, D).

    The checkpoint stores this conv weight-normalised (g, v); the loader folds g * v / |v|
    into a plain kernel, since inference never needs the two factors apart.
    """

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        k = config.num_conv_pos_embeddings
        self.conv = nnx.Conv(
            config.hidden_size,
            config.hidden_size,
            kernel_size=k,
            padding=((k // 2, k // 2),),  # a tuple keeps the graphdef hashable
            feature_group_count=config.num_conv_pos_embedding_groups,
            dtype=dtype,
            rngs=rngs,
        )
        # Symmetric padding of k//2 yields T + 1 outputs for an even kernel (128 in every
        # released model); PyTorch drops the last one, so do we.
        self.num_pad_remove = 1 if k % 2 == 0 else 0
        self.activation = activation(config.feat_extract_activation)

    def __call__(self, x: Array) -> Array:
        y = self.conv(x)
        if self.num_pad_remove:
            y = y[:, : -self.num_pad_remove]
        return self.activation(y)


class Attention(nnx.Module):
    """Bidirectional multi-head self-attention. (B, T, D) -> (B, T, D)."""

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        heads = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(heads)
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads)
        # Scale 1/sqrt(head_dim) as in HF; fused (cuDNN flash) kernels where the backend has them.
        out = jax.nn.dot_product_attention(q, k, v)
        return self.out_proj(out.reshape(b, t, d))


class FeedForward(nnx.Module):
    """Position-wise MLP D -> intermediate_size -> D."""

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        self.intermediate_dense = nnx.Linear(
            config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs
        )
        self.output_dense = nnx.Linear(
            config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs
        )
        self.activation = activation(config.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.output_dense(self.activation(self.intermediate_dense(x)))


class EncoderLayer(nnx.Module):
    """Transformer block; pre-LN when `config.do_stable_layer_norm`, else post-LN (BERT-style).

    Both variants own the same four sub-modules, so checkpoints of either map identically.
    """

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.pre_ln = config.do_stable_layer_norm
        self.attention = Attention(config, dtype=dtype, rngs=rngs)
        self.layer_norm = nnx.LayerNorm(
            d, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs
        )
        self.feed_forward = FeedForward(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(
            d, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: Array) -> Array:
        if self.pre_ln:
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nnx.Module):
    """Positional conv + transformer stack. (B, T, D) -> (B, T, D).

    The single encoder LayerNorm sits before the layers in the post-LN variant and after them
    in the pre-LN one (where the residual stream is otherwise never normalised).
    """

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        self.pre_ln = config.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(config, dtype=dtype, rngs=rngs)
        self.layer_norm = nnx.LayerNorm(
            config.hidden_size,
            epsilon=config.layer_norm_eps,
            use_fast_variance=False,
            dtype=dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [EncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: Array) -> Array:
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        if self.pre_ln:
            x = self.layer_norm(x)
        return x


class Wav2Vec2Model(nnx.Module):
    """Normalised waveform (B, N) -> contextual features (B, output_frames(N), hidden_size)."""

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        self.feature_extractor = FeatureEncoder(config, dtype=dtype, rngs=rngs)
        self.feature_projection = FeatureProjection(config, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_values: Array) -> Array:
        features = self.feature_extractor(input_values)
        return self.encoder(self.feature_projection(features))


class Wav2Vec2ForCTC(nnx.Module):
    """Wav2Vec2 + linear CTC head: (B, N) waveform -> (B, output_frames(N), vocab_size) logits.

    `input_values` must already be what `Wav2Vec2FeatureExtractor` produces: 16 kHz mono,
    normalised to zero mean / unit variance per clip when the extractor's `do_normalize` is
    set (it is for the xlsr/large checkpoints). Frames are 20 ms apart (50 Hz); frame i
    starts at sample 320 i. `dtype` is the compute dtype (parameters stay float32).
    """

    def __init__(self, config: Wav2Vec2Config, *, dtype: Any = None, rngs: nnx.Rngs):
        self.config = config
        self.wav2vec2 = Wav2Vec2Model(config, dtype=dtype, rngs=rngs)
        self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs)

    def __call__(self, input_values: Array) -> Array:
        if input_values.ndim != 2:
            raise ValueError(
                f"input_values must be (batch, samples), got shape {input_values.shape}"
            )
        if output_frames(input_values.shape[1], self.config) < 1:
            raise ValueError(
                f"{input_values.shape[1]} samples are shorter than the conv stack's receptive field"
            )
        return self.lm_head(self.wav2vec2(input_values))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, input_values: Array) -> Array:
    return nnx.merge(graphdef, state)(input_values)


def run_wav2vec2(model: Wav2Vec2ForCTC, input_values: Any) -> np.ndarray:
    """Jitted inference: (B, N) normalised waveform -> (B, output_frames(N), vocab) numpy logits.

    Compiles once per architecture and input length (split/merge keeps nnx's per-call
    Python overhead out of long feature-extraction loops).
    """
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(input_values, jnp.float32)))
