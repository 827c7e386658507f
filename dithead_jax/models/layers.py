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

Array = jax.Array
Initializer = Callable[..., Array]
LogicalNames = tuple[str | None, ...]

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
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        attended = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return self.out(attended)


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
