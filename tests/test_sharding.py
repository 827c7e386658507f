"""Meshes, logical-axis rules, golden PartitionSpecs, and sharded == single-device steps.

All on 8 simulated CPU devices (conftest.py).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dithead_jax import sharding
from dithead_jax.config import DiffusionConfig, DiTConfig, MeshConfig, TrainConfig
from dithead_jax.models.dit import DiT
from dithead_jax.training import dit_step
from dithead_jax.training.state import abstract_train_state, create_train_state, make_optimizer

PRESETS = ("dp", "fsdp", "fsdp_tp")


def test_mesh_presets_and_specs():
    assert jax.device_count() == 8
    shapes = {p: tuple(sharding.make_mesh(p).shape.values()) for p in PRESETS}
    assert shapes == {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "fsdp_tp": (1, 4, 2)}
    mesh = sharding.make_mesh("data=2,fsdp=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sharding.mesh_config({"data": 1, "fsdp": -1, "tensor": 2}) == MeshConfig.preset(
        "fsdp_tp"
    )
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(MeshConfig(data=-1, fsdp=-1))
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh("data=3,fsdp=-1")
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.make_mesh("data=2,fsdp=2")
    with pytest.raises(ValueError, match="unknown mesh axis"):
        sharding.mesh_config("model=2")


def test_logical_to_spec_rules():
    mesh = sharding.make_mesh("fsdp_tp")  # fsdp=4, tensor=2
    rules = sharding.DIT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh) == P("fsdp", "tensor")
    # Size-1 axes vanish: the batch is split over fsdp only here.
    assert sharding.batch_spec(rules, mesh) == P("fsdp")
    assert sharding.batch_shards(rules, mesh) == 4
    # One mesh axis per array at most: the second "embed" stays whole.
    assert sharding.logical_to_spec(("embed", "embed"), rules, mesh) == P("fsdp", None)
    # Indivisible dimensions are not split (DiT-S has 6 heads; 6 % 4 != 0).
    wide = sharding.make_mesh("fsdp=2,tensor=4")
    assert sharding.logical_to_spec(("heads", "kv"), rules, wide, (6, 64)) == P(None, None)
    assert sharding.logical_to_spec(("activation_batch",), rules, wide, (6,)) == P("fsdp")
    assert sharding.logical_to_spec((None, "unknown"), rules, mesh) == P(None, None)
    # The VQGAN rules give the tensor axis to the batch and split conv outputs over fsdp.
    vq = sharding.VQGAN_RULES
    assert sharding.batch_spec(vq, mesh) == P(("fsdp", "tensor"))
    spec = sharding.logical_to_spec((None, None, "conv_in", "conv_out"), vq, mesh, (3, 3, 128, 256))
    assert spec == P(None, None, None, "fsdp")
    assert sharding.logical_to_spec(("codebook", "codebook_dim"), vq, mesh) == P(None, None)


def test_constrain_resolves_activation_names_against_the_current_mesh_and_rules():
    mesh = sharding.make_mesh("fsdp_tp")  # fsdp=4, tensor=2
    names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    seen = []

    def f(x):
        y = sharding.constrain(x, names)
        seen.append(y is x)
        return y * 2

    def lower(fn=f):  # a fresh function each time: jax's trace cache ignores flax's rules
        return jax.jit(lambda x: fn(x)).lower(np.ones((8, 4, 6, 2), np.float32)).as_text()

    # No rules or no mesh: the identity, so single-device code and sampling need nothing.
    lower()
    with jax.set_mesh(mesh):
        lower()
    with nnx.logical_axis_rules(sharding.DIT_RULES):
        lower()
    assert seen == [True, True, True]
    assert "sharding_constraint" not in lower()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DIT_RULES):
        # Batch over data x fsdp (data is size 1 here), heads over tensor.
        assert '[{"fsdp"}, {}, {"tensor"}, {}]' in lower()
        with pytest.raises(ValueError, match="do not match shape"):
            lower(lambda x: sharding.constrain(x, names[:3]))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.VQGAN_RULES):
        # The VQGAN rules give every axis to the batch; names they do not know stay whole.
        assert '[{"fsdp", "tensor"}, {}, {}, {}]' in lower()
    # Activation and parameter names are separate: the residual stream's width stays whole
    # while a weight's "embed" is split over fsdp.
    rules = sharding.DIT_RULES
    assert sharding.logical_to_spec(("activation_embed",), rules, mesh) == P(None)
    assert sharding.logical_to_spec(("embed",), rules, mesh) == P("fsdp")


# ---------------------------------------------------------------------------------------
# Golden PartitionSpecs of DiT-L/2 (shapes only: nothing is allocated)

_GOLDEN = {  # path -> {preset: spec}; dp replicates everything
    "patch_embed/proj/kernel": {"fsdp": P(None, None, None, "fsdp"),
                                "fsdp_tp": P(None, None, None, "fsdp")},
    "patch_embed/proj/bias": {"fsdp": P("fsdp"), "fsdp_tp": P("fsdp")},
    "t_embedder/fc1/kernel": {"fsdp": P(None, None), "fsdp_tp": P(None, "tensor")},
    "t_embedder/fc2/kernel": {"fsdp": P(None, "fsdp"), "fsdp_tp": P("tensor", "fsdp")},
    "context_embedder/frame_proj/kernel": {"fsdp": P(None, "fsdp"), "fsdp_tp": P(None, "fsdp")},
    "context_embedder/frame_pos": {"fsdp": P(None, "fsdp"), "fsdp_tp": P(None, "fsdp")},
    "blocks/0/attn/qkv/kernel": {"fsdp": P("fsdp", None, None, None),
                                 "fsdp_tp": P("fsdp", None, "tensor", None)},
    "blocks/0/attn/qkv/bias": {"fsdp": P(None, None, None), "fsdp_tp": P(None, "tensor", None)},
    "blocks/0/attn/out/kernel": {"fsdp": P(None, None, "fsdp"),
                                 "fsdp_tp": P("tensor", None, "fsdp")},
    "blocks/0/attn/out/bias": {"fsdp": P("fsdp"), "fsdp_tp": P("fsdp")},
    "blocks/0/cross_attn/q/kernel": {"fsdp": P("fsdp", None, None),
                                     "fsdp_tp": P("fsdp", "tensor", None)},
    "blocks/0/cross_attn/kv/kernel": {"fsdp": P("fsdp", None, None, None),
                                      "fsdp_tp": P("fsdp", None, "tensor", None)},
    "blocks/0/cross_attn/out/kernel": {"fsdp": P(None, None, "fsdp"),
                                       "fsdp_tp": P("tensor", None, "fsdp")},
    "blocks/0/cross_norm/scale": {"fsdp": P(None), "fsdp_tp": P(None)},
    "blocks/0/mlp/fc1/kernel": {"fsdp": P("fsdp", None), "fsdp_tp": P("fsdp", "tensor")},
    "blocks/0/mlp/fc1/bias": {"fsdp": P(None), "fsdp_tp": P("tensor")},
    "blocks/0/mlp/fc2/kernel": {"fsdp": P(None, "fsdp"), "fsdp_tp": P("tensor", "fsdp")},
    "blocks/0/modulation/kernel": {"fsdp": P("fsdp", None), "fsdp_tp": P("fsdp", "tensor")},
    "final_layer/modulation/kernel": {"fsdp": P("fsdp", None), "fsdp_tp": P("fsdp", "tensor")},
    "final_layer/proj/kernel": {"fsdp": P("fsdp", None), "fsdp_tp": P("fsdp", None)},
    "final_layer/proj/bias": {"fsdp": P(None), "fsdp_tp": P(None)},
}  # fmt: skip


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys if
                    getattr(k, "name", None) != "value")  # fmt: skip


@functools.cache
def _l2_abstract():
    """DiT-L/2's abstract train state, traced once (tracing L/2 costs seconds here)."""
    return abstract_train_state(
        lambda r: DiT(DiTConfig.L_2(), rngs=r),
        make_optimizer(TrainConfig()),
        mesh=sharding.make_mesh("dp"),
        rules=sharding.DIT_RULES,
    ).abstract


@pytest.mark.parametrize("preset", PRESETS)
def test_golden_partition_specs_dit_l2(preset):
    abstract = _l2_abstract()
    mesh = sharding.make_mesh(preset)
    shardings = sharding.tree_shardings(abstract, sharding.DIT_RULES, mesh)
    leaves = jax.tree.leaves_with_path(shardings.params)
    specs = {_path(path): s.spec for path, s in leaves}
    for name, golden in _GOLDEN.items():
        want = golden.get(preset) or P(*[None] * len(specs[name]))
        assert specs[name] == want, (name, specs[name], want)
    # Every block is laid out like block 0.
    for name, spec in specs.items():
        if name.startswith("blocks/"):
            assert spec == specs["blocks/0/" + name.split("/", 2)[2]], name
    # FSDP really divides the weights: per-device parameter bytes ~ total / 8.
    per_device = total = 0
    for leaf, s in zip(*map(jax.tree.leaves, (abstract.params, shardings.params)), strict=True):
        total += leaf.size * 4
        per_device += int(np.prod(s.shard_shape(leaf.shape))) * 4
    assert 2.1e9 < total < 2.3e9  # ~560M float32 parameters
    expect = {"dp": 1.0, "fsdp": 1 / 8, "fsdp_tp": 1 / 8}[preset]
    assert per_device / total == pytest.approx(expect, rel=0.02)
    # Adam's moments and the EMA follow the parameters' layout.
    mu = shardings.opt_state[0].mu
    assert jax.tree.map(lambda s: s.spec, mu) == jax.tree.map(lambda s: s.spec, shardings.params)
    assert shardings.step.spec == P()


# ---------------------------------------------------------------------------------------
# A sharded train step equals the single-device one


def _batch(cfg: DiTConfig, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = (n, cfg.input_size, cfg.input_size, cfg.latent_channels)
    return {
        "latent": rng.normal(size=latent).astype(np.float32),
        "masked_latent": rng.normal(size=latent).astype(np.float32),
        "reference_latent": rng.normal(size=latent).astype(np.float32),
        "audio": rng.normal(size=(n, cfg.audio_window, cfg.audio_dim)).astype(np.float32),
    }


@functools.cache
def _initial_state():
    """One fresh state on one device (as numpy), re-placed on every mesh below: creation
    in sharded form is exercised by test_training; here only the step is under test."""
    mesh = sharding.make_mesh("dp", jax.devices()[:1])
    state, _ = create_train_state(
        lambda r: DiT(DiTConfig.testing(), rngs=r),
        make_optimizer(TrainConfig()),
        seed=0,
        mesh=mesh,
        rules=sharding.DIT_RULES,
        compiler_options=dit_step.FAST_COMPILE_CPU,
    )
    return jax.device_get(state)


def _run_steps(devices, preset: str, steps: int = 2, model_cfg: DiTConfig | None = None):
    model_cfg = model_cfg or DiTConfig.testing()
    train = TrainConfig(global_batch_size=8)
    mesh = sharding.make_mesh(preset, devices)
    setup = abstract_train_state(
        lambda r: DiT(model_cfg, rngs=r), make_optimizer(train), mesh=mesh, rules=sharding.DIT_RULES
    )
    state = jax.device_put(_initial_state(), setup.shardings)
    batch_sharding = sharding.batch_sharding(sharding.DIT_RULES, mesh)
    step_fn = dit_step.make_train_step(setup, DiffusionConfig(), train)
    step = dit_step.jit_train_step(
        step_fn, setup, batch_sharding, compiler_options=dit_step.FAST_COMPILE_CPU
    )
    losses = []
    for i in range(steps):
        batch = {k: jax.device_put(v, batch_sharding) for k, v in _batch(model_cfg, 8, i).items()}
        with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DIT_RULES):
            state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    params = {_path(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(state.params)}
    return losses, params, state


@functools.cache
def _single_device_run():
    return _run_steps(jax.devices()[:1], "dp")


@pytest.mark.parametrize("preset", PRESETS)
def test_sharded_step_matches_single_device(preset):
    ref_losses, ref_params, _ = _single_device_run()
    losses, params, state = _run_steps(jax.devices(), preset)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        np.testing.assert_allclose(value, ref_params[name], atol=1e-5, rtol=0, err_msg=name)
    # The step's outputs keep the layout they came in with (donation works in place).
    kernel = state.params["blocks"][0]["mlp"]["fc1"]["kernel"]
    want = {"dp": P(None, None), "fsdp": P("fsdp", None), "fsdp_tp": P("fsdp", "tensor")}
    assert kernel.get_value().sharding.spec == want[preset]
    # Two steps moved the adaLN gates off zero, so the blocks are being trained.
    assert np.abs(params["blocks/0/modulation/kernel"]).max() > 0


def test_mesh_sizes_are_checked_and_messages_say_per_slice_only_with_slices():
    shapes = lambda spec, n: sharding.ici_dcn_shapes(sharding.mesh_config(spec), n)  # noqa: E731
    for spec in ("data=0", "data=-2"):
        with pytest.raises(ValueError, match="positive or -1"):
            shapes(spec, 8)
    with pytest.raises(ValueError, match=r"^8 devices per slice cannot be split"):
        shapes("data=3,fsdp=-1,dcn_data=2", 16)
    with pytest.raises(ValueError, match=r"^8 devices cannot be split"):
        shapes("data=3,fsdp=-1", 8)
    with pytest.raises(ValueError, match="needs 16 devices, there are 8$"):
        shapes("data=4,fsdp=4", 8)


def test_tree_specs_replicate_unnamed_leaves():
    """Plain arrays (and scalars) carry no logical names: every dimension whole."""
    specs = sharding.tree_specs(
        {"a": np.zeros((8, 4)), "b": 3.0}, sharding.DIT_RULES, sharding.make_mesh("fsdp")
    )
    assert specs == {"a": P(None, None), "b": P()}
