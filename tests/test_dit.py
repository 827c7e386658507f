"""The DiT-Head denoiser (dithead_jax/models/dit.py, layers.py).

Big models are only ever built abstractly (`nnx.eval_shape`); everything that runs uses
`DiTConfig.testing()` (16x16 latents, D=64, 2 blocks) through a few module-level jitted
functions keyed on the (static) graphdef, so each config compiles once for the whole file
(eager dispatch would compile every op separately, which is slower on this CPU).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dithead_jax.config import DiTConfig
from dithead_jax.models import layers
from dithead_jax.models.dit import DiT, stack_blocks, unstack_blocks
from dithead_jax.models.layers import count_params

B = 2
VOCABULARY = {"embed", "mlp", "heads", "kv", "conv_in", "patch", "audio", "norm", "layers", None}


def inputs(cfg: DiTConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, cfg.input_size, cfg.input_size, 3 * cfg.latent_channels))
    audio = rng.normal(size=(B, cfg.audio_window, cfg.audio_dim))
    t = np.array([3, 871][:B], np.int32)
    return jnp.asarray(x, jnp.float32), jnp.asarray(t), jnp.asarray(audio, jnp.float32)


def abstract(cfg: DiTConfig) -> DiT:
    return nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))


@functools.cache
def initial_params(cfg: DiTConfig, seed: int = 0) -> dict:
    """A real initialisation, jitted: eager init would compile ~50 ops one by one."""
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(DiT(cfg, rngs=nnx.Rngs(seed)), nnx.Param)))
    return init()


def build(cfg: DiTConfig, params: dict) -> DiT:
    """A model of `cfg` holding `params` (pure dict, loop or scan layout as cfg says)."""
    model = abstract(cfg)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def params_of(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, t, audio):
    return nnx.merge(graphdef, state)(x, t, audio)


def forward(model: DiT, x, t, audio) -> np.ndarray:
    """model(x, t, audio), compiled once per (config, shapes) across the whole file."""
    return np.asarray(_apply(*nnx.split(model), x, t, audio))


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, params, x, t, audio, target):
    def loss_fn(params):
        return jnp.mean((nnx.merge(graphdef, params)(x, t, audio) - target) ** 2)

    return jax.value_and_grad(loss_fn)(params)


def loss_and_grads(model: DiT, x, t, audio, target) -> tuple[jax.Array, nnx.State]:
    """MSE to `target` and its gradient w.r.t. the parameters (one compile per config)."""
    return _loss_and_grads(*nnx.split(model, nnx.Param), x, t, audio, target)


def random_params(cfg: DiTConfig, seed: int = 0, scale: float = 0.05) -> dict:
    """Every parameter random (numpy, so nothing compiles); for tests that need no init."""
    rng = np.random.default_rng(seed)
    shapes = params_of(abstract(cfg))
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.normal(size=a.shape), a.dtype), shapes)


def is_cross_out(path) -> bool:
    keys = [str(getattr(k, "key", k)) for k in path]
    return "cross_attn" in keys and "out" in keys


def randomize_zero_inits(params: dict, seed: int = 0, scale: float = 0.05, keep_cross=True):
    """Give the zero-initialised parameters (adaLN, final layer) random values, so the model
    computes something non-trivial; the cross-attention output projection stays zero unless
    `keep_cross=False`."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if np.any(np.asarray(x)) or (keep_cross and is_cross_out(path)):
            return x
        return jnp.asarray(scale * rng.normal(size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, params)


# ---------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------

# DiT-L/2 (D=1024, depth 24, MLP 4096, patch 2, 9 input / 3 output channels), by hand:
#   patch embed     36*1024 + 1024                                    =      37,888
#   timestep MLP    256*1024 + 1024 + 1024*1024 + 1024                 =   1,312,768
#   per block: adaLN 1024*6144 + 6144                                 =   6,297,600
#              qkv 1024*3072 + 3072, out 1024*1024 + 1024              =   4,198,400
#              MLP 1024*4096 + 4096 + 4096*1024 + 1024                 =   8,393,728
#              block total 18,889,728; x 24                          = 453,353,472
#   final layer adaLN 1024*2048 + 2048, linear 1024*12 + 12            =   2,111,500
#   total without cross-attention                                     = 456,815,628
# facebookresearch/DiT-L/2 differs only in 4 input channels (-20*1024), 8 outputs
# (+20*(1024+1)) and its 1001x1024 class table: 456,815,628 - 20,480 + 20,500 + 1,025,024
#   = 457,840,672, the "458M" of the DiT paper (its fixed pos_embed buffer not counted).
# Cross-attention, per block: LayerNorm 2*1024, q 1024*1024 + 1024,
#   kv 1024*2048 + 2048, out 1024*1024 + 1024 = 4,200,448; x 24        = 100,810,752
# Audio context: Linear(33 -> 1024) 34,816 + positions 11*1024 11,264 =      46,080
#   total with cross-attention                                        = 557,672,460
DIT_L2_PLAIN = 456_815_628
DIT_L2_AUDIO = 557_672_460
DIT_L2_REFERENCE = 457_840_672


def test_dit_l2_parameter_count():
    assert DIT_L2_PLAIN - 20 * 1024 + 20 * 1025 + 1001 * 1024 == DIT_L2_REFERENCE
    assert round(DIT_L2_REFERENCE / 1e6) == 458
    # scan_layers only stacks the same parameters (checked below on the tiny model) and
    # traces one block instead of 24, which keeps this test fast.
    counts = {
        cross: count_params(
            nnx.eval_shape(
                lambda cross=cross: DiT(
                    DiTConfig.L_2(cross_attention=cross, scan_layers=True), rngs=nnx.Rngs(0)
                )
            )
        )
        for cross in (False, True)
    }
    assert counts[False] == DIT_L2_PLAIN
    assert counts[True] == DIT_L2_AUDIO
    tiny = [
        count_params(
            nnx.eval_shape(lambda s=s: DiT(DiTConfig.testing(scan_layers=s), rngs=nnx.Rngs(0)))
        )
        for s in (False, True)
    ]
    assert tiny[0] == tiny[1]


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_output_shapes(size, patch):
    cfg = DiTConfig.named(f"{size}_{patch}", scan_layers=True)
    x = jax.ShapeDtypeStruct((B, 64, 64, 9), jnp.float32)
    t = jax.ShapeDtypeStruct((B,), jnp.int32)
    audio = jax.ShapeDtypeStruct((B, 11, 33), jnp.float32)
    out = jax.eval_shape(lambda *a: DiT(cfg, rngs=nnx.Rngs(0))(*a), x, t, audio)
    assert out.shape == (B, 64, 64, 3) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "overrides, out_channels",
    [
        (dict(learn_sigma=True), 6),
        (dict(context_layout="single_token"), 3),
        (dict(cross_attention=False), 3),
        (dict(dtype="bfloat16"), 3),
    ],
)
def test_variant_shapes(overrides, out_channels):
    cfg = DiTConfig.testing(**overrides)
    out = jax.eval_shape(lambda *a: DiT(cfg, rngs=nnx.Rngs(0))(*a), *inputs(cfg))
    assert out.shape == (B, 16, 16, out_channels) and out.dtype == jnp.float32


def test_rejects_wrong_input_shape():
    model = nnx.eval_shape(lambda: DiT(DiTConfig.testing(), rngs=nnx.Rngs(0)))
    x, t, audio = inputs(DiTConfig.testing())
    with pytest.raises(ValueError, match="expected"):
        model(x[..., :6], t, audio)


def test_logical_axis_names():
    for scan in (False, True):
        model = nnx.eval_shape(
            lambda s=scan: DiT(DiTConfig.testing(scan_layers=s), rngs=nnx.Rngs(0))
        )
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.shape), (path, names)
            assert set(names) <= VOCABULARY, (path, names)
            assert (names[0] == "layers") == (scan and path[0] == "blocks"), (path, names)
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
        assert specs["final_layer"]["proj"]["kernel"].value == jax.P("embed", "patch")


def test_sincos_positions():
    table = layers.sincos_2d(8, 3)  # 9 tokens, 2 frequencies per (sin, cos) x (col, row)
    assert table.shape == (9, 8)
    row, col = 1, 2
    token = table[row * 3 + col]
    np.testing.assert_allclose(
        token[:4], [np.sin(col), np.sin(col / 100), np.cos(col), np.cos(col / 100)], rtol=1e-6
    )
    np.testing.assert_allclose(
        token[4:], [np.sin(row), np.sin(row / 100), np.cos(row), np.cos(row / 100)], rtol=1e-6
    )


# ---------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------


def test_fresh_model_ignores_audio_until_trained():
    cfg = DiTConfig.testing()
    x, t, audio = inputs(cfg)
    other_audio = inputs(cfg, seed=1)[2]
    fresh = initial_params(cfg)
    # adaLN-Zero: a fresh DiT predicts exactly zero.
    assert not np.any(forward(build(cfg, fresh), x, t, audio))

    # With the zero-initialised adaLN/final layers made random, the model computes
    # something, yet still not from the audio: the cross-attention output is zero.
    model = build(cfg, randomize_zero_inits(fresh))
    out = forward(model, x, t, audio)
    assert np.abs(out).max() > 1e-2
    np.testing.assert_array_equal(out, forward(model, x, t, other_audio))

    # A few Adam steps on random targets move the cross-attention and audio matters.
    optimizer = optax.adam(1e-2)

    @jax.jit
    def adam_step(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    target = jnp.asarray(np.random.default_rng(2).normal(size=out.shape), jnp.float32)
    params = nnx.state(model, nnx.Param)
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(4):
        loss, grads = loss_and_grads(build(cfg, nnx.to_pure_dict(params)), x, t, audio, target)
        params, opt_state = adam_step(grads, opt_state, params)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    trained = build(cfg, nnx.to_pure_dict(params))
    assert np.abs(np.asarray(trained.blocks[0].cross_attn.out.kernel.value)).max() > 0
    difference = np.abs(forward(trained, x, t, audio) - forward(trained, x, t, other_audio))
    assert difference.max() > 1e-4


def test_single_token_layout():
    cfg = DiTConfig.testing(context_layout="single_token")
    model = build(cfg, random_params(cfg))
    # One context token of width 2D = [Linear(363 -> D)(audio) | timestep embedding].
    assert model.context_embedder.window_proj.kernel.value.shape == (11 * 33, 64)
    assert model.blocks[0].cross_attn.kv.kernel.value.shape == (128, 2, 4, 16)
    x, t, audio = inputs(cfg)
    out, out_other = forward(model, x, t, audio), forward(model, x, t, inputs(cfg, seed=1)[2])
    assert np.all(np.isfinite(out))
    assert np.abs(out - out_other).max() > 1e-5


def test_no_cross_attention_is_a_plain_dit():
    cfg = DiTConfig.testing(cross_attention=False)
    model = abstract(cfg)
    assert model.context_embedder is None and model.blocks[0].cross_attn is None
    x, t, _ = inputs(cfg)
    out = jax.eval_shape(lambda x, t: DiT(cfg, rngs=nnx.Rngs(0))(x, t), x, t)  # no audio
    assert out.shape == (B, 16, 16, 3)


@pytest.fixture(scope="module")
def reference():
    """Tiny loop model with every parameter non-zero: params, inputs, output, loss, grads."""
    cfg = DiTConfig.testing()
    params = randomize_zero_inits(initial_params(cfg), keep_cross=False)
    model = build(cfg, params)
    args = inputs(cfg)
    target = jnp.asarray(np.random.default_rng(5).normal(size=(B, 16, 16, 3)), jnp.float32)
    loss, grads = loss_and_grads(model, *args, target)
    return dict(
        params=params,
        args=args,
        target=target,
        out=forward(model, *args),
        loss=float(loss),
        grads=nnx.to_pure_dict(grads),
    )


def variant(reference, **overrides) -> DiT:
    """The reference weights in a model with other options (scan layout if asked)."""
    params = reference["params"]
    return build(
        DiTConfig.testing(**overrides),
        stack_blocks(params) if overrides.get("scan_layers") else params,
    )


def test_scan_layers_matches_loop(reference):
    model = variant(reference, scan_layers=True)
    np.testing.assert_allclose(forward(model, *reference["args"]), reference["out"], atol=1e-5)
    # Round trip of the layout conversion is exact.
    back = unstack_blocks(params_of(model))
    jax.tree.map(np.testing.assert_array_equal, back, reference["params"])


@pytest.mark.parametrize(
    "overrides",
    [dict(remat_policy="full"), dict(remat_policy="dots_saveable", scan_layers=True)],
)
def test_remat_same_output_and_grads(reference, overrides):
    model = variant(reference, **overrides)
    loss, grads = loss_and_grads(model, *reference["args"], reference["target"])
    grads = nnx.to_pure_dict(grads)
    if overrides.get("scan_layers"):
        grads = unstack_blocks(grads)
    assert float(loss) == pytest.approx(reference["loss"], rel=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
        grads,
        reference["grads"],
    )


def test_remat_policy_names():
    assert layers.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
    with pytest.raises(ValueError):
        layers.remat_policy("save_only_these_names")


def test_bf16_compute_close_to_f32(reference):
    model = variant(reference, dtype="bfloat16")
    assert model.blocks[0].mlp.fc1.kernel.value.dtype == jnp.float32  # params stay f32
    out = forward(model, *reference["args"])
    assert out.dtype == np.float32
    scale = np.abs(reference["out"]).max()
    error = np.abs(out - reference["out"]).max()
    assert 0 < error < 0.05 * scale, (error, scale)


def test_attention_impl_is_passed_through():
    cfg = DiTConfig.testing(attention_impl="xla")
    assert abstract(cfg).blocks[0].attn.implementation == "xla"
    out = jax.eval_shape(lambda *a: DiT(cfg, rngs=nnx.Rngs(0))(*a), *inputs(cfg))
    assert out.shape == (B, 16, 16, 3)


def test_attention_auto_resolution():
    resolve = layers.resolve_attention
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve("auto", bf16) == "blockwise"  # this CPU
    assert resolve("auto", f32, platform="cpu") == "blockwise"
    assert resolve("auto", bf16, platform="gpu") == "cudnn"
    assert resolve("auto", jnp.float16, platform="cuda") == "cudnn"
    assert resolve("auto", f32, platform="gpu") == "xla"  # cuDNN has no f32 flash kernel
    assert resolve("auto", f32, platform="tpu") == "splash"
    assert resolve("auto", bf16, self_attention=False, platform="tpu") == "xla"
    assert resolve("auto", bf16, self_attention=False, platform="gpu") == "xla"
    assert resolve("splash", bf16, self_attention=False) == "xla"
    assert resolve(None, bf16, platform="gpu") is None and resolve("cudnn", f32) == "cudnn"
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        resolve("flash", f32)


def test_attention_auto_equals_reference_on_cpu(reference):
    model = variant(reference, attention_impl="auto")
    np.testing.assert_array_equal(forward(model, *reference["args"]), reference["out"])


def test_splash_attention_lowers_for_tpu_on_a_mesh():
    """The TPU kernel cannot run here, but JAX lowers Pallas TPU kernels on any host: the
    self-attention becomes a Mosaic custom call inside a shard_map over batch and heads,
    forward and backward; the cross-attention (12 keys) stays XLA."""
    from dithead_jax import sharding

    cfg = DiTConfig.testing(
        input_size=32, hidden_size=128, num_heads=2, depth=1, attention_impl="splash"
    )
    model = abstract(cfg)
    assert model.blocks[0].attn.implementation == "splash"
    graphdef, params = nnx.split(model)

    def loss(params, x, t, audio):
        return jnp.sum(nnx.merge(graphdef, params)(x, t, audio))

    args = [jax.ShapeDtypeStruct((8, *a.shape[1:]), a.dtype) for a in inputs(cfg)]
    mesh = sharding.make_mesh("fsdp_tp")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DIT_RULES):
        traced = jax.jit(jax.grad(loss)).trace(params, *args)
        hlo = traced.lower(lowering_platforms=("tpu",)).as_text()
    # splash kernels: forward, and dq / dkv in the backward pass.
    assert hlo.count("tpu_custom_call") >= 3
    assert "sdy.manual_computation" in hlo and '[{"fsdp"}, {}, {"tensor"}, {}]' in hlo


def test_timestep_embedding_matches_formula():
    emb = np.asarray(jax.jit(layers.timestep_embedding, static_argnums=1)(jnp.array([0, 10]), 8))
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    np.testing.assert_allclose(
        emb[1], np.concatenate([np.cos(10 * freqs), np.sin(10 * freqs)]), rtol=1e-5
    )
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_splash_kernel_matches_xla_attention_in_the_pallas_interpreter():
    """The TPU kernel's numerics, run by Pallas' interpreter on this CPU: forward and
    gradients equal XLA's attention (what "auto" uses here)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, 64)), jnp.float32) for _ in range(3))

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)

    splash = functools.partial(layers.splash_attention, interpret=True)
    out, grads = jax.jit(jax.value_and_grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    ref_out, ref_grads = jax.value_and_grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("variant", ["L_2", "XL_2"])
def test_paper_run_configs_train_in_bf16_with_scan_remat_and_auto_attention(variant):
    import configs.dit as dit_configs
    from dithead_jax.config import from_dict

    model = from_dict(DiTConfig, dit_configs.get_config(variant).model)
    assert (model.dtype, model.param_dtype) == ("bfloat16", "float32")
    assert model.scan_layers and model.attention_impl == "auto"
    assert layers.remat_policy(model.remat_policy) is not None  # a real policy name
