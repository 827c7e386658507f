"""Blockwise (flash-style) multi-head attention in pure JAX, with a FlashAttention-2 VJP.

`jax.nn.dot_product_attention(implementation="xla")` builds the (B, heads, L, L) scores,
keeps the softmax for the backward pass and builds (B, heads, L, L) gradients there: at
DiT's 1024 tokens those are the largest buffers of the step, and on CPU the memory
traffic they cause costs more than the FLOPs. Here the keys are consumed in blocks with an
online softmax (running row max `m` and row sum `total`), so the forward pass holds one
(B, heads, forward_rows, block_k) tile at a time, and a `jax.custom_vjp` saves only q, k,
v, the output and the per-row log-sum-exp. The backward pass recomputes each
(block_q, block_k) score tile from them (FlashAttention-2, Dao 2023, Algorithm 2):
P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P * (dP - D) with D = rowsum(dO * O),
dQ += dS K, dK += dS^T Q.
Neither pass materialises an (L, L) array. Pure `lax` code: runs on every backend, is
partitioned by XLA's SPMD pass like any other einsum (batch / heads shard as they come),
and serves where no fused kernel applies (f32 on GPU, CPU).

Layout: q, k, v are (B, L, heads, head_dim) as `jax.nn.dot_product_attention` takes them;
internally blocks are laid out (n_blocks, B, heads, block, head_dim) so `lax.scan` walks
the leading axis. Scores, softmax and every accumulator are f32 (bf16 inputs included);
matmul operands stay in the input dtype with f32 accumulation, as the reference does.

Padding rule: a length that is not a multiple of its block is zero-padded up to one; padded
keys are masked out of the softmax (so they receive zero gradient), padded query rows are
computed and sliced away (their cotangent is zero). A block larger than the sequence is
shrunk to it. Callers that have only a handful of keys (DiT's 12-frame audio
cross-attention) should use the plain path: see `layers.resolve_attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Defaults measured on a 2-core CPU at L=1024, head_dim=64 (DiT-S/2), forward + backward:
# bench/attention.py, and the whole train step in alternating runs.
# The backward pass is where the time goes, and its tile is (block_q, block_k): 1024 x 128
# ran the train step ~12% faster than 128 x 128 (fewer, larger GEMMs; 8 key steps instead of
# 64 tiles), and attention alone 1.35-1.55x. Its live tiles are those the forward already
# holds at FORWARD_ROWS, so peak memory does not grow: 25 MiB temp vs 147 MiB for the XLA
# reference. block_k 64 halves the GEMMs' width and ran 1.7x slower; 256 was no faster.
# On GPU/TPU smaller query blocks bound the per-tile memory at large batch x heads: pass them.
BLOCK_Q = 1024
BLOCK_K = 128
FORWARD_ROWS = 1024


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    forward_rows: int = FORWARD_ROWS,
) -> Array:
    """softmax(q k^T / sqrt(D)) v without the (L, L) scores, unmasked (bidirectional).

    q: (B, Lq, heads, D); k, v: (B, Lk, heads, D) -> (B, Lq, heads, D) in q's dtype.
    Tiles are (block_q, block_k); the forward pass takes forward_rows // block_q query
    blocks per step (at least one), so its tile is (forward_rows, block_k).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(f"want (B, L, heads, D) q/k/v, got {q.shape} {k.shape} {v.shape}")
    if min(block_q, block_k, forward_rows) < 1:
        raise ValueError(f"blocks must be positive, got {block_q=} {block_k=} {forward_rows=}")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    length, kv_length = q.shape[1], k.shape[1]
    block_q, block_k = min(block_q, length), min(block_k, kv_length)
    qb = _to_blocks(q, block_q)
    kb, vb = _to_blocks(k, block_k), _to_blocks(v, block_k)
    per_step = max(1, min(qb.shape[0], forward_rows // block_q))
    out = _attention(qb, kb, vb, kv_length, per_step)
    return _from_blocks(out, length)


def _to_blocks(x: Array, block: int) -> Array:
    """(B, L, heads, D) -> (ceil(L / block), B, heads, block, D), zero-padded at the end."""
    batch, length, heads, dim = x.shape
    n = -(-length // block)
    if n * block != length:
        x = jnp.pad(x, ((0, 0), (0, n * block - length), (0, 0), (0, 0)))
    return x.reshape(batch, n, block, heads, dim).transpose(1, 0, 3, 2, 4)


def _from_blocks(x: Array, length: int) -> Array:
    """Inverse of `_to_blocks` (drops the padding)."""
    n, batch, heads, block, dim = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(batch, n * block, heads, dim)[:, :length]


def _scores(qi: Array, kj: Array, j: Array, kv_length: int) -> Array:
    """Scaled f32 scores (B, heads, block_q, block_k) of one tile; padded keys -> -inf."""
    scale = 1.0 / math.sqrt(qi.shape[-1])
    s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
    block_k = kj.shape[-2]
    if kv_length % block_k:  # static: only padded shapes pay for the mask
        valid = j * block_k + jnp.arange(block_k) < kv_length
        s = jnp.where(valid, s, -jnp.inf)
    return s


def _forward(qb: Array, kb: Array, vb: Array, kv_length: int, per_step: int):
    """Blocked output (nq, B, heads, block_q, D) in q's dtype and f32 lse (nq, B, heads, bq)."""
    n_k = kb.shape[0]

    def query_block(qi: Array) -> tuple[Array, Array]:
        rows = qi.shape[:-1]  # (B, heads, block_q)

        def key_block(carry, xs):
            m, total, acc = carry
            kj, vj, j = xs
            s = _scores(qi, kj, j, kv_length)
            m_new = jnp.maximum(m, s.max(-1))
            # The first block always holds real keys (padding sits at the end), so m_new is
            # finite from the first step on and exp(-inf - m_new) = 0 rescales the empty
            # initial state without NaNs.
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            total = alpha * total + p.sum(-1)
            pv = jnp.einsum(
                "bhqk,bhkd->bhqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
            )
            return (m_new, total, alpha[..., None] * acc + pv), None

        init = (
            jnp.full(rows, -jnp.inf, jnp.float32),
            jnp.zeros(rows, jnp.float32),
            jnp.zeros(qi.shape, jnp.float32),
        )
        (m, total, acc), _ = lax.scan(key_block, init, (kb, vb, jnp.arange(n_k)))
        return (acc / total[..., None]).astype(qi.dtype), m + jnp.log(total)

    # lax.map walks the query blocks `per_step` at a time (vmapped within a step): only
    # those blocks' accumulators and (per_step * block_q, block_k) scores are live.
    return lax.map(query_block, qb, batch_size=per_step)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(qb: Array, kb: Array, vb: Array, kv_length: int, per_step: int) -> Array:
    """Blocked attention (nq, B, heads, block_q, D); kv_length: keys before padding."""
    return _forward(qb, kb, vb, kv_length, per_step)[0]


def _attention_fwd(qb, kb, vb, kv_length, per_step):
    out, lse = _forward(qb, kb, vb, kv_length, per_step)
    return out, (qb, kb, vb, out, lse)


def _attention_bwd(kv_length, per_step, residuals, d_out):
    del per_step  # the backward pass always walks (block_q, block_k) tiles
    qb, kb, vb, out, lse = residuals
    scale = 1.0 / math.sqrt(qb.shape[-1])
    dtype = qb.dtype
    # D_i = rowsum(dO * O) = rowsum(dP * P): the softmax Jacobian's diagonal correction.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    d_out = d_out.astype(dtype)

    def key_block(dq, xs):
        """One key block against every query block: its dK, dV, and the dQ updates."""
        kj, vj, j = xs

        def query_block(carry, xs):
            dk, dv = carry
            qi, doi, lse_i, delta_i, dq_i = xs
            s = _scores(qi, kj, j, kv_length)
            p = jnp.exp(s - lse_i[..., None])  # the forward softmax, exactly (0 on padding)
            dv = dv + jnp.einsum(
                "bhqk,bhqd->bhkd", p.astype(dtype), doi, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(dtype)
            dq_i = dq_i + jnp.einsum("bhqk,bhkd->bhqd", ds, kj, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
            return (dk, dv), dq_i

        zeros = jnp.zeros(kj.shape, jnp.float32)
        # The dQ accumulator goes in as scanned input and comes back as scanned output, so
        # each query block's slice is read and written once per key block, in place.
        (dk, dv), dq = lax.scan(query_block, (zeros, zeros), (qb, d_out, lse, delta, dq))
        return dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = lax.scan(key_block, dq0, (kb, vb, jnp.arange(kb.shape[0])))
    return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
