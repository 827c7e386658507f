"""A small SyncNet-style lip-sync expert, trained on our own data (no official weights).

Two towers map 0.2 s of video and the matching audio to unit-length embeddings whose
cosine similarity is high when lips and speech are in sync:

    lips:  (b, 5, S, S, 3) face crops in [-1, 1] -> the lower half (b, S/2, S, 5 x 3),
           frames stacked on channels frame-major, as SyncNet v2's first conv does;
           one 3x3 stride-2 conv + ReLU per `lip_channels` entry, then the flattened grid
           -> Linear -> embed_dim. At S = 64: (32, 64, 15) -> ... -> (2, 4, 256) -> 128.
    audio: (b, W, D) the per-frame audio feature window (11 x 33 in DiT-Head) centred on
           the window's middle frame: 1-D convs (k 3) over time with D input channels,
           flattened -> Linear -> embed_dim.

Why the centre frame's feature window and not MFCC: it is exactly what a stage-2 batch
holds for every target frame (`audio`, (W, D)), so the same expert scores generated videos
(features recomputed from the waveform the way preprocessing did) AND supervises the DiT
inside its training step from the batch alone. For frames i..i+4 the window of frame i+2
covers features i-3..i+7: the 5 frames' own audio plus 3 frames of context either side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dithead_jax.config import SyncExpertConfig
from dithead_jax.models.layers import linear, partitioned

LIP_FRAMES = 5  # frames per lip window (0.2 s at 25 fps), as SyncNet
CENTRE = LIP_FRAMES // 2  # the window's audio is the centre frame's feature window


def lower_half(frames: Float[Array, "b t s s 3"]) -> Float[Array, "b s/2 s 3t"]:
    """The lower half of each crop (rows S/2..S), frames stacked on channels (3 t + c)."""
    b, t, s, w, c = frames.shape
    lower = frames[:, :, s // 2 :]
    return jnp.transpose(lower, (0, 2, 3, 1, 4)).reshape(b, s - s // 2, w, t * c)


def _conv(cin: int, cout: int, kernel: tuple[int, ...], strides: int, rngs: nnx.Rngs) -> nnx.Conv:
    spatial = (None,) * len(kernel)
    return nnx.Conv(
        cin,
        cout,
        kernel_size=kernel,
        strides=strides,
        padding="SAME",
        kernel_init=partitioned(nnx.initializers.he_normal(), (*spatial, "conv_in", "conv_out")),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


class SyncExpert(nnx.Module):
    """lips (b, 5, S, S, 3) and audio (b, W, D) -> unit embeddings (b, E) each."""

    def __init__(self, cfg: SyncExpertConfig, audio_window: int, audio_dim: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        channels = [3 * LIP_FRAMES, *cfg.lip_channels]
        pairs = zip(channels[:-1], channels[1:], strict=True)
        self.lip_convs = nnx.List([_conv(a, b, (3, 3), 2, rngs) for a, b in pairs])
        factor = 2 ** len(cfg.lip_channels)
        grid = (cfg.image_size // 2 // factor) * (cfg.image_size // factor)
        self.lip_out = linear(grid * channels[-1], cfg.embed_dim, ("embed", None), rngs=rngs)
        channels = [audio_dim, *cfg.audio_channels]
        pairs = zip(channels[:-1], channels[1:], strict=True)
        self.audio_convs = nnx.List([_conv(a, b, (3,), 1, rngs) for a, b in pairs])
        self.audio_out = linear(
            audio_window * channels[-1], cfg.embed_dim, ("embed", None), rngs=rngs
        )

    def embed_lips(self, frames: Float[Array, "b 5 s s 3"]) -> Float[Array, "b e"]:
        x = lower_half(frames)
        for conv in self.lip_convs:
            x = jax.nn.relu(conv(x))
        return _unit(self.lip_out(x.reshape(x.shape[0], -1)))

    def embed_audio(self, audio: Float[Array, "b w d"]) -> Float[Array, "b e"]:
        x = audio
        for conv in self.audio_convs:
            x = jax.nn.relu(conv(x))
        return _unit(self.audio_out(x.reshape(x.shape[0], -1)))

    def __call__(
        self, frames: Float[Array, "b 5 s s 3"], audio: Float[Array, "b w d"]
    ) -> tuple[Float[Array, "b e"], Float[Array, "b e"]]:
        return self.embed_lips(frames), self.embed_audio(audio)


def _unit(x: Array) -> Array:
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def info_nce(
    lips: Float[Array, "b e"],
    audio: Float[Array, "b e"],
    shifted: Float[Array, "b e"] | None,
    temperature: float,
) -> tuple[Array, dict[str, Array]]:
    """InfoNCE of each lip window against its own audio among every audio in the batch
    (other clips and other times) plus, with `shifted`, its own clip's audio at an offset.

    logits[i] = cos(lips_i, [audio_0 .. audio_{b-1}, shifted_i]) / temperature; the target
    is audio_i. Returns (mean cross-entropy, {"accuracy": top-1 over all candidates,
    "offset_accuracy": fraction with cos(lips_i, audio_i) > cos(lips_i, shifted_i)}).
    """
    logits = lips @ audio.T  # (b, b) cosines: the embeddings are unit vectors
    metrics = {}
    if shifted is not None:
        own_shift = jnp.sum(lips * shifted, axis=-1)  # (b,)
        metrics["offset_accuracy"] = jnp.mean(jnp.diagonal(logits) > own_shift)
        logits = jnp.concatenate([logits, own_shift[:, None]], axis=1)
    logits = logits / temperature
    target = jnp.arange(lips.shape[0])
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(logp[target, target])
    metrics["accuracy"] = jnp.mean(jnp.argmax(logits, axis=-1) == target)
    return loss, metrics


def sync_distance(lips: Float[Array, "b e"], audio: Float[Array, "b e"]) -> Float[Array, " b"]:
    """1 - cosine similarity of unit embeddings, in [0, 2]: 0 = in sync."""
    return 1.0 - jnp.sum(lips * audio, axis=-1)
