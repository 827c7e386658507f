"""The blockwise (flash-style) attention equals `jax.nn.dot_product_attention` in values and
gradients, inside the DiT, on a mesh, and compiles without any (L, L) buffer."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dithead_jax import sharding
from dithead_jax.config import DiTConfig
from dithead_jax.models import layers
from dithead_jax.models.blockwise_attention import BLOCK_K, blockwise_attention
from dithead_jax.models.dit import DiT


def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def blockwise(block_q: int, block_k: int, forward_rows: int = 1024):
    return lambda q, k, v: blockwise_attention(
        q, k, v, block_q=block_q, block_k=block_k, forward_rows=forward_rows
    )


def qkvw(shape_q, length_k=None, dtype=jnp.float32, seed=0):
    """q (B, Lq, H, D), k and v (B, Lk, H, D), and a cotangent-like weight shaped like q."""
    rng = np.random.default_rng(seed)
    shape_k = (shape_q[0], length_k or shape_q[1], *shape_q[2:])
    q, w = (rng.normal(size=shape_q) for _ in range(2))
    k, v = (rng.normal(size=shape_k) for _ in range(2))
    return *(jnp.asarray(a, dtype) for a in (q, k, v)), jnp.asarray(w, jnp.float32)


def value_and_grads(attention, q, k, v, w):
    """out and d(sum(out * w))/d(q, k, v): every cotangent entry is distinct."""

    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close(actual, desired, rel: float, name: str = ""):
    actual, desired = (np.asarray(a, np.float32) for a in (actual, desired))
    scale = np.abs(desired).max()
    np.testing.assert_allclose(actual, desired, rtol=rel, atol=rel * scale, err_msg=name)


@pytest.mark.parametrize(
    "length, length_k, block_q, block_k, forward_rows, dtype",
    [
        (256, None, 64, 64, 64, jnp.float32),  # 4 x 4 tiles, 1 query block per step
        (1024, None, 128, 128, 1024, jnp.float32),  # DiT's 1024 tokens, the defaults
        (1024, None, 256, 256, 256, jnp.float32),
        (100, None, 32, 48, 32, jnp.float32),  # padded: 4 x 3 tiles, the last ones partial
        (100, None, 32, 48, 96, jnp.float32),  # forward: 3 query blocks, then the 4th
        (72, 200, 64, 96, 1024, jnp.float32),  # cross-shaped: Lq != Lk, both padded
        (256, None, 64, 128, 128, jnp.bfloat16),  # f32 accumulation, bf16 operands
    ],
)
def test_values_and_gradients_match_reference(
    length, length_k, block_q, block_k, forward_rows, dtype
):
    q, k, v, w = qkvw((2, length, 3, 64), length_k, dtype)
    out, grads = value_and_grads(blockwise(block_q, block_k, forward_rows), q, k, v, w)
    ref_out, ref_grads = value_and_grads(reference, q, k, v, w)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # bf16: both sides round their matmul operands (P, dS) to bf16, at different places.
    rel = 1e-5 if dtype == jnp.float32 else 3e-2
    assert_close(out, ref_out, rel, "out")
    for name, g, ref_g in zip("qkv", grads, ref_grads, strict=True):
        assert_close(g, ref_g, rel, f"d{name}")


def test_resolution_sends_cross_attention_to_xla_and_auto_to_blockwise_on_cpu_only():
    resolve = layers.resolve_attention
    assert resolve("blockwise", jnp.float32) == "blockwise"
    assert resolve("blockwise", jnp.bfloat16, platform="tpu") == "blockwise"
    assert resolve("blockwise", jnp.float32, self_attention=False) == "xla"
    assert resolve("auto", jnp.float32, platform="cpu") == "blockwise"  # measured faster
    for platform in ("gpu", "tpu"):  # fused kernels there
        assert resolve("auto", jnp.bfloat16, platform=platform) != "blockwise"


# ---------------------------------------------------------------------------------------
# Inside the DiT
# ---------------------------------------------------------------------------------------

# 32x32 latents, patch 2: 256 tokens, more than one key block (so the blockwise path runs;
# DiTConfig.testing()'s 64 tokens would be routed to the plain path).
DIT_OVERRIDES = dict(input_size=32)
B = 8


def dit_inputs(cfg: DiTConfig):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, cfg.input_size, cfg.input_size, 3 * cfg.latent_channels))
    audio = rng.normal(size=(B, cfg.audio_window, cfg.audio_dim))
    target = rng.normal(size=(B, cfg.input_size, cfg.input_size, cfg.latent_channels))
    t = rng.integers(0, 1000, size=B).astype(np.int32)
    return tuple(jnp.asarray(a) for a in (x, t, audio, target))


def dit_model(attention_impl):
    """Tiny DiT with every parameter random (the zero inits too, so every path counts)."""
    cfg = DiTConfig.testing(attention_impl=attention_impl, **DIT_OVERRIDES)
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: jnp.asarray(0.05 * rng.normal(size=a.shape), a.dtype), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return cfg, model


def dit_loss_and_grads(model, x, t, audio, target):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        out = nnx.merge(graphdef, params)(x, t, audio)
        return jnp.mean((out - target) ** 2), out

    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return out, nnx.to_pure_dict(grads)


def assert_trees_close(actual, desired, rel):
    flat_a, flat_d = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (actual, desired))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_d]
    for (path, a), (_, d) in zip(flat_a, flat_d, strict=True):
        assert_close(a, d, rel, jax.tree_util.keystr(path))


def test_dit_blockwise_equals_default_attention():
    cfg, model = dit_model("blockwise")
    _, ref_model = dit_model(None)
    args = dit_inputs(cfg)
    assert (cfg.input_size // cfg.patch_size) ** 2 > BLOCK_K
    calls = lambda m: str(jax.make_jaxpr(lambda *a: m(*a))(*args[:3])).count("custom_vjp_call")
    assert calls(model) == cfg.depth and calls(ref_model) == 0  # self-attention only
    out, grads = jax.jit(dit_loss_and_grads)(model, *args)
    ref_out, ref_grads = jax.jit(dit_loss_and_grads)(ref_model, *args)
    assert_close(out, ref_out, 1e-5, "out")
    assert_trees_close(grads, ref_grads, 1e-5)


# ---------------------------------------------------------------------------------------
# On a mesh (8 simulated devices, tests/conftest.py)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["dp", "fsdp_tp"])
def test_sharded_equals_single_device(preset):
    """Batch over the data axes, heads over "tensor" (fsdp_tp): the same values and grads."""
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(preset)
    q, k, v, w = qkvw((8, 256, 2, 32), seed=3)
    attention = blockwise(64, 128)
    out, grads = value_and_grads(attention, q, k, v, w)
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    placed = [jax.device_put(a, spec) for a in (q, k, v, w)]
    with jax.set_mesh(mesh):
        s_out, s_grads = value_and_grads(attention, *placed)
    assert s_out.sharding.is_equivalent_to(spec, 4)  # stays split: no gather to one device
    assert_close(s_out, out, 1e-6, "out")
    for name, g, ref_g in zip("qkv", s_grads, grads, strict=True):
        assert_close(g, ref_g, 1e-6, f"d{name}")


def test_sharded_dit_equals_single_device():
    """The tiny blockwise DiT, batch split 8 ways under the DiT's logical rules."""
    cfg, model = dit_model("blockwise")
    args = dit_inputs(cfg)
    out, grads = jax.jit(dit_loss_and_grads)(model, *args)
    mesh = sharding.make_mesh("dp")
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    placed = [jax.device_put(a, batch) for a in args]
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DIT_RULES):
        s_out, s_grads = jax.jit(dit_loss_and_grads)(nnx.merge(graphdef, state), *placed)
    assert not s_out.sharding.is_fully_replicated  # each device ran its own examples
    assert_close(s_out, out, 1e-5, "out")
    assert_trees_close(s_grads, grads, 1e-5)


# ---------------------------------------------------------------------------------------
# Memory: the compiled program
# ---------------------------------------------------------------------------------------

SQUARE = re.compile(r"[\[,]1024,1024\]")  # any f32[..., 1024, 1024] buffer


def test_compiled_forward_backward_holds_no_square_buffer():
    q, k, v, w = qkvw((1, 1024, 2, 64))

    def compiled(attention):
        def loss(q, k, v):
            return jnp.sum(attention(q, k, v) * w)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()

    ours, ref = compiled(blockwise_attention), compiled(reference)  # default blocks
    assert SQUARE.search(ref.as_text())
    assert not SQUARE.search(ours.as_text())
    ours_temp = ours.memory_analysis().temp_size_in_bytes
    assert ours_temp < ref.memory_analysis().temp_size_in_bytes / 2
