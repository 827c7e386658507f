"""Small NNX building blocks shared by the DiT (and usable elsewhere).

Every parameter is created through `partitioned(init, names)`, which attaches *logical* axis
names (see the vocabulary at the top of `dit.py`) and nothing else: no mesh, no eager
sharding. `dithead_jax/sharding.py` maps the names to mesh axes later
(`nnx.eval_shape` -> `nnx.get_partition_spec` -> rules -> `jax.jit(init, out_shardings=...)`).
Eager sharding is switched off per variable because flax would otherwise demand a mesh the
moment a model is built, which would break every CPU test and `nnx.eval_shape`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax import sharding
from dithead_jax.models import blockwise_attention as blockwise

Array = jax.Array
Initializer = Callable[..., Array]
LogicalNames = tuple[str | None, ...]
# q / k / v activations (B, L, heads, kv); see sharding.py for the activation names.
HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def count_params(tree: nnx.Module | object) -> int:
    """Number of parameters: a module's `nnx.Param`s, or every array of a parameter tree
    (a TrainState's `params`); works on `nnx.eval_shape` results too (shapes only)."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# DiT's initialisations (facebookresearch/DiT `initialize_weights`), in JAX terms.
xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()
normal_002 = nnx.initializers.normal(stddev=0.02)


def partitioned(init: Initializer, names: LogicalNames) -> Initializer:
    """`init` with logical axis names attached (one per dimension of the parameter)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN: x (B, L, D) scaled and shifted per example by (B, D) vectors."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ---------------------------------------------------------------------------------------
# Fixed embeddings (numpy, computed once per shape; they are constants, not parameters)
# ---------------------------------------------------------------------------------------


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) [sin | cos] at geometric frequencies 1 .. 1e-4."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D position table (grid_size**2, embed_dim) for tokens in row-major order.

    The first half of the channels encodes the column index and the second half the row
    index. That is the order facebookresearch/DiT ends up with, so imported weights see the
    positions they were trained on. Returned read-only because it is cached.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    table = np.concatenate(
        [sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1
    ).astype(np.float32)
    table.flags.writeable = False
    return table


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """(B,) int or float timesteps -> (B, dim) float32 [cos | sin] features (as in DiT/ADM)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


def linear(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    kernel_init: Initializer = xavier_uniform,
    bias_init: Initializer = zeros,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """`nnx.Linear` with DiT's default init and logical names (in, out); bias gets (out,)."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=partitioned(kernel_init, names),
        bias_init=partitioned(bias_init, names[1:]),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class TimestepEmbedder(nnx.Module):
    """Scalar diffusion timesteps -> (B, hidden) vectors: sinusoids, then a 2-layer SiLU MLP."""

    def __init__(
        self,
        hidden_size: int,
        frequency_size: int = 256,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.frequency_size = frequency_size
        kw = dict(kernel_init=normal_002, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The sinusoid axis is tiny and never worth sharding: None.
        self.fc1 = linear(frequency_size, hidden_size, (None, "mlp"), **kw)
        self.fc2 = linear(hidden_size, hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, t: Array) -> Array:
        """t: (B,) -> (B, hidden)."""
        h = self.fc1(timestep_embedding(t, self.frequency_size))
        return self.fc2(nnx.silu(h))


class Mlp(nnx.Module):
    """Transformer feed-forward: Linear -> GELU(tanh) -> Linear."""

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(features, hidden_features, ("embed", "mlp"), **kw)
        self.fc2 = linear(hidden_features, features, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class Attention(nnx.Module):
    """Multi-head attention through `jax.nn.dot_product_attention`.

    Self-attention when `context_size` is None (one fused q/k/v projection, like timm's),
    cross-attention otherwise: queries from x, keys and values from a context sequence of
    width `context_size`. Projections keep heads as a separate axis, (embed, [3,] heads, kv),
    so tensor parallelism can split whole heads; they are initialised as if flattened to
    2-D, which is exactly DiT's xavier init of its fused Linear.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        context_size: int | None = None,
        *,
        zero_init_output: bool = False,
        implementation: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by heads {num_heads}")
        head_dim = hidden_size // num_heads
        self.implementation = implementation
        self.is_cross = context_size is not None

        def projection(in_size: int, out_shape: Sequence[int], names: LogicalNames):
            return nnx.LinearGeneral(
                in_size,
                tuple(out_shape),
                kernel_init=partitioned(xavier_uniform, ("embed", *names)),
                bias_init=partitioned(zeros, tuple(names)),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        if self.is_cross:
            self.q = projection(hidden_size, (num_heads, head_dim), ("heads", "kv"))
            self.kv = projection(context_size, (2, num_heads, head_dim), (None, "heads", "kv"))
        else:
            self.qkv = projection(hidden_size, (3, num_heads, head_dim), (None, "heads", "kv"))
        out_init = zeros if zero_init_output else xavier_uniform
        self.out = nnx.LinearGeneral(
            (num_heads, head_dim),
            hidden_size,
            axis=(-2, -1),
            kernel_init=partitioned(out_init, ("heads", "kv", "embed")),
            bias_init=partitioned(zeros, ("embed",)),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        """x: (B, L, D); context: (B, S, C) for cross-attention. Returns (B, L, D)."""
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q = self.q(x)  # (B, L, heads, kv)
            k, v = jnp.moveaxis(self.kv(context), -3, 0)  # each (B, S, heads, kv)
        else:
            q, k, v = jnp.moveaxis(self.qkv(x), -3, 0)
        # Projections may have promoted to float32 if x was; attention wants one dtype.
        # Pinned by example and head: the (B, heads, L, S) scores are the largest buffers of
        # the step, so their layout should not hang on XLA's propagation heuristics.
        q, k, v = (sharding.constrain(a.astype(q.dtype), HEADS) for a in (q, k, v))
        impl = resolve_attention(self.implementation, q.dtype, self_attention=not self.is_cross)
        if impl == "splash" and q.shape[1] % _SPLASH_BLOCK:
            impl = "xla"  # the kernel tiles the sequence in blocks of 128
        if impl == "blockwise" and k.shape[1] <= blockwise.BLOCK_K:
            impl = "xla"  # one key block: the plain path holds no bigger scores
        if impl == "splash":
            attended = splash_attention(q, k, v)
        elif impl == "blockwise":
            attended = blockwise.blockwise_attention(q, k, v)
        else:
            attended = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return self.out(attended)


ATTENTION_IMPLS = (None, "auto", "xla", "cudnn", "splash", "blockwise")
_SPLASH_BLOCK = 128


def resolve_attention(
    implementation: str | None,
    dtype: jnp.dtype,
    *,
    self_attention: bool = True,
    platform: str | None = None,
) -> str | None:
    """The attention kernel for `implementation` ("auto" decides at trace time by the
    backend, `platform` overriding it) for the self-attention: cuDNN flash attention on GPU
    in bf16/fp16 (cuDNN has no f32 kernel), the Pallas splash kernel on TPU, the blockwise
    one on CPU (bench/attention.py and bench/dit.py --peer: its forward + backward runs
    2-2.4x XLA's per FLOP at 1024 tokens; at <= BLOCK_K keys it is XLA's), XLA otherwise.
    The audio cross-attention has 12 keys (or 1), below any kernel's block and ~1% of the
    attention FLOPs: XLA under "auto", and also when "splash" or "blockwise" is asked for.
    "blockwise" is the pure-JAX flash-style attention (models/blockwise_attention.py: no
    (L, L) buffers, forward or backward) for any backend.
    None leaves the choice to `jax.nn.dot_product_attention` (XLA today)."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {implementation!r}: choose from {ATTENTION_IMPLS}")
    if implementation in ("auto", "splash", "blockwise") and not self_attention:
        return "xla"
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    if platform == "cpu":
        return "blockwise"
    return "xla"


def splash_attention(q: Array, k: Array, v: Array, *, interpret: bool = False) -> Array:
    """Unmasked multi-head attention through the TPU Pallas splash kernel.

    q, k, v: (B, L, heads, kv) -> (B, L, heads, kv). A Pallas call has no SPMD partitioning
    rule, so on a mesh it runs under `shard_map` with the batch and heads split as the
    q/k/v activation rules say (each device: its examples, its heads, all L keys).
    `interpret=True` runs the kernel in Pallas' interpreter (any backend; for tests).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    scale = q.shape[-1] ** -0.5

    def local(q: Array, k: Array, v: Array) -> Array:
        heads, length, keys = q.shape[2], q.shape[1], k.shape[1]
        mask = splash.MultiHeadMask([splash.FullMask((length, keys))] * heads)
        kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
        to_heads = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  (B, heads, L, kv)
        out = jax.vmap(kernel)(to_heads(q * scale), to_heads(k), to_heads(v))
        return to_heads(out)

    spec = sharding.current_spec(HEADS, q.shape)
    if spec is None:
        return local(q, k, v)
    mesh = jax.sharding.get_abstract_mesh()
    # check_vma=False: the splash kernel's outputs carry no varying-axes annotation.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        q, k, v
    )


def remat_policy(name: str) -> Callable[..., bool] | None:
    """Checkpoint policy by name: "full" saves nothing (recompute all), otherwise the
    `jax.checkpoint_policies` member of that name (e.g. "dots_saveable",
    "dots_with_no_batch_dims_saveable"). "none" is handled by the caller (no remat at all).
    """
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith(("save_", "offload_")):
        # The save_*/offload_* members are policy *factories* that need arguments.
        known = ["none", "full", "everything_saveable", "dots_saveable", "checkpoint_dots"]
        known += ["dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims"]
        raise ValueError(f"unknown remat policy {name!r}; use one of {known}")
    return policy
