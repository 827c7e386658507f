"""Classifier-free guidance on audio and DiffTalk's temporal audio filter.

The DiT under test is `DiTConfig.testing(depth=1)` with every parameter ~ N(0, 0.1^2)
(LayerNorm scales 1 + that): a fresh DiT's zero-initialised output projections would make
its output ignore the audio, so conditional and null-audio passes would agree and guidance
would be invisible. Parameters are filled from numpy (a jitted random init costs seconds of
compile here); every jit uses FAST_COMPILE_CPU. Keys are "rbg" (a threefry normal takes
seconds to compile): each comparison below runs one order against itself, so the keys'
vmap-variance does not matter.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dithead_jax.config import ConfigError, DiffusionConfig, DiTConfig
from dithead_jax.diffusion import ddim
from dithead_jax.diffusion import schedule as sch
from dithead_jax.models.dit import DiT
from dithead_jax.models.layers import count_params
from dithead_jax.training import dit_step

SCHEDULE = sch.make_schedule(DiffusionConfig())
FAST = dit_step.FAST_COMPILE_CPU
CFG = DiTConfig.testing(depth=1, null_audio=True)
STEPS = 3

pytestmark = pytest.mark.filterwarnings("ignore:rbg keys are not vmap-invariant")


def random_state(cfg: DiTConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        value = 0.1 * rng.standard_normal(leaf.shape)
        value += 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(value, leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


@functools.cache
def tiny():
    return random_state(CFG)


def clip(b: int = 1, n: int = 3, seed: int = 0):
    """masked (B, N, h, w, C), audio (B, N, 11, 33), first reference (B, h, w, C)."""
    rng = np.random.default_rng(seed)
    size, c = CFG.input_size, CFG.latent_channels
    return (
        jnp.asarray(rng.standard_normal((b, n, size, size, c)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, n, 11, 33)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, size, size, c)), jnp.float32),
    )


@functools.partial(
    jax.jit, static_argnames=("mode", "order", "guidance", "by_hand"), compiler_options=FAST
)
def sample(state, masked, audio, first, rng, *, mode, order, guidance=None, by_hand=False):
    """sample_video on the tiny DiT. guidance=None: the call as it was before guidance
    existed (no argument). by_hand: guidance done outside the sampler, by a model_fn that
    runs the conditional and the null-audio pass as two separate calls."""
    model = nnx.merge(tiny()[0], state)
    model_fn = model
    kwargs = {} if guidance is None else {"guidance": guidance}
    if by_hand:

        def model_fn(x, t, a):
            cond = model(x, t, a)
            uncond = model(x, t, a, jnp.ones(x.shape[0], bool))
            return uncond + guidance * (cond - uncond)

        kwargs = {}
    return ddim.sample_video(
        model_fn, SCHEDULE, masked, audio, first, rng, num_steps=STEPS, mode=mode, order=order,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ddim.MODES)
def test_scale_one_is_the_unguided_sampler_bit_for_bit(mode):
    """At w = 1 every order of every mode traces to the very program it traced to before
    guidance existed (one call on M rows, not uncond + 1 * (cond - uncond), which differs
    from cond by round-off): equal jaxprs compile to equal numbers, bit for bit. Compared
    as programs, so the test costs tracing, not 2 compiles per (mode, order)."""
    _, state = tiny()
    masked, audio, first = clip()
    rng = jax.random.key(3, impl="rbg")
    orders = ddim._ALLOWED_ORDERS[mode]
    for order in orders:
        kw = dict(mode=mode, order=order)
        plain = jax.make_jaxpr(functools.partial(sample.__wrapped__, **kw))
        one = jax.make_jaxpr(functools.partial(sample.__wrapped__, guidance=1.0, **kw))
        three = jax.make_jaxpr(functools.partial(sample.__wrapped__, guidance=3.0, **kw))
        args = (state, masked, audio, first, rng)
        assert str(one(*args)) == str(plain(*args)), order
        assert str(three(*args)) != str(plain(*args)), order


def test_scale_w_equals_two_separate_calls_combined_by_hand():
    _, state = tiny()
    masked, audio, first = clip()
    rng = jax.random.key(3, impl="rbg")
    kw = dict(mode="x0_same_step", order="wavefront")
    guided = np.asarray(sample(state, masked, audio, first, rng, guidance=3.0, **kw))
    by_hand = np.asarray(sample(state, masked, audio, first, rng, guidance=3.0, by_hand=True, **kw))
    plain = np.asarray(sample(state, masked, audio, first, rng, **kw))
    scale = np.abs(by_hand).max()
    # One call on 2M rows vs two on M: the matmuls may group rows differently (~1e-6).
    np.testing.assert_allclose(guided, by_hand, rtol=1e-5, atol=1e-5 * scale)
    # ...and guidance really changes the video (the null context differs from the audio).
    assert np.abs(guided - plain).max() > 1e-2 * scale


def test_guidance_batches_cond_and_uncond_in_one_call_per_step():
    """Every order makes the calls it made unguided, each on 2x the rows, half flagged."""
    calls = []

    def model_fn(x, t, audio, drop_audio=None):
        calls.append((x.shape[0], None if drop_audio is None else np.asarray(drop_audio)))
        return jnp.zeros(x.shape[:-1] + (3,), x.dtype)

    masked, audio, first = clip(b=2, n=3)
    for order, mode in (("nested", "final"), ("wavefront", "x0_same_step"), ("parallel", "fixed")):
        calls.clear()
        run = functools.partial(
            ddim.sample_video, model_fn, SCHEDULE, num_steps=STEPS, mode=mode, order=order,
            guidance=2.0,
        )  # fmt: skip
        jax.eval_shape(run, masked, audio, first, jax.random.key(0, impl="rbg"))
        slots = 2 * ddim.dit_calls_per_clip(order, 3, STEPS)["slots_per_call"]
        # fori_loop traces each body once: nested has two nested bodies, one call each.
        assert len(calls) == 1, order
        rows, drop = calls[0]
        assert rows == 2 * slots, order
        np.testing.assert_array_equal(drop, np.arange(2 * slots) >= slots)


# ---------------------------------------------------------------------------------------
# The null context in the model and in training


def batch(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size, c = CFG.input_size, CFG.latent_channels
    latents = {k: jnp.asarray(rng.standard_normal((n, size, size, c)), jnp.float32)
               for k in ("latent", "masked_latent", "reference_latent")}  # fmt: skip
    return latents | {"audio": jnp.asarray(rng.standard_normal((n, 11, 33)), jnp.float32)}


LOSS_KEY = 3  # at p = 0.5 it drops 2 of the 4 examples


@pytest.fixture(scope="module")
def dropout_losses():
    """Every loss and null-context gradient the dropout tests read, from ONE compile (each
    value_and_grad compiles for seconds here). `plain` is the same network built without
    the null (the paper's params tree): its state is this one's minus `null_audio`."""
    graphdef, state = tiny()
    params = nnx.to_pure_dict(state)
    params["context_embedder"] = dict(params["context_embedder"])
    del params["context_embedder"]["null_audio"]
    plain_graphdef, plain_state = random_state(DiTConfig.testing(depth=1))
    nnx.replace_by_pure_dict(plain_state, params)  # raises if any other path differed
    data = batch()
    other = dict(data, audio=data["audio"][::-1] * 2.0)
    rng = jax.random.key(LOSS_KEY)

    def loss(graphdef, state, data, p):
        return dit_step.dit_loss(nnx.merge(graphdef, state), data, rng, SCHEDULE, "epsilon", 0, p)

    def null_grad(p):
        grads = jax.grad(lambda s: loss(graphdef, s, data, p)[0])(state)
        return grads["context_embedder"]["null_audio"].value

    def old_loss(state):  # dit_loss as it was before audio dropout existed
        model = nnx.merge(graphdef, state)
        return sch.training_loss(
            lambda z_t, t: model(dit_step.model_input(z_t, data), t, data["audio"]),
            SCHEDULE, data["latent"], rng,
        )[0]  # fmt: skip

    @functools.partial(jax.jit, compiler_options=FAST)
    def run(state, plain_state):
        return {
            "drop_all": loss(graphdef, state, data, 1.0)[0],
            "drop_all_other_audio": loss(graphdef, state, other, 1.0)[0],
            "keep": loss(graphdef, state, data, 0.0)[0],
            "keep_other_audio": loss(graphdef, state, other, 0.0)[0],
            "old": old_loss(state),
            "plain_model": loss(plain_graphdef, plain_state, data, 0.0)[0],
            "grad_drop_all": null_grad(1.0),
            "grad_keep": null_grad(0.0),
            "grad_half": null_grad(0.5),
        }

    return jax.device_get(run(state, plain_state))


def test_audio_dropout_one_makes_the_loss_ignore_the_audio(dropout_losses):
    out = dropout_losses
    assert out["drop_all"] == out["drop_all_other_audio"]
    # Without dropout the same batch does depend on its audio.
    assert abs(out["keep"] - out["keep_other_audio"]) > 1e-4 * out["keep"]
    assert np.abs(out["grad_drop_all"]).max() > 1e-4


def test_audio_dropout_zero_is_the_plain_loss_and_leaves_the_null_alone(dropout_losses):
    out = dropout_losses
    assert out["keep"] == out["old"] == out["plain_model"]
    np.testing.assert_array_equal(out["grad_keep"], 0.0)


def test_null_context_gets_gradient_under_partial_dropout(dropout_losses):
    drop = jax.random.bernoulli(jax.random.fold_in(jax.random.key(LOSS_KEY), 1), 0.5, (4,))
    assert 0 < int(drop.sum()) < 4  # this key drops some examples and keeps others
    assert np.abs(dropout_losses["grad_half"]).max() > 1e-5


@pytest.mark.parametrize("layout, tokens", [("audio_tokens", 11), ("single_token", 1)])
def test_null_audio_replaces_the_audio_per_example_in_both_layouts(layout, tokens):
    cfg = DiTConfig.testing(depth=1, null_audio=True, context_layout=layout)
    graphdef, state = random_state(cfg)
    assert state["context_embedder"]["null_audio"].value.shape == (tokens, cfg.hidden_size)
    assert count_params(nnx.merge(graphdef, state)) - count_params(
        nnx.eval_shape(lambda: DiT(DiTConfig.testing(depth=1, context_layout=layout),
                                   rngs=nnx.Rngs(0)))
    ) == tokens * cfg.hidden_size  # fmt: skip
    data = batch(2)
    x = dit_step.model_input(data["latent"], data)
    t = jnp.array([100, 800])
    run = jax.jit(lambda s, a, d: nnx.merge(graphdef, s)(x, t, a, d), compiler_options=FAST)
    drop = jnp.array([True, False])
    a1, a2 = data["audio"], data["audio"] * -3.0
    out1, out2 = np.asarray(run(state, a1, drop)), np.asarray(run(state, a2, drop))
    np.testing.assert_array_equal(out1[0], out2[0])  # dropped: the audio is not read
    assert np.abs(out1[1] - out2[1]).max() > 1e-4  # kept: it is
    # Rows are independent: the kept row is what it is when nothing is dropped.
    np.testing.assert_array_equal(out1[1], np.asarray(run(state, a1, drop & False))[1])


def test_config_checks():
    with pytest.raises(ConfigError, match="audio_dropout"):
        DiffusionConfig(audio_dropout=1.0)
    with pytest.raises(ConfigError, match="audio_filter"):
        DiTConfig.testing(audio_filter=True, context_layout="single_token")
    with pytest.raises(ConfigError, match="null_audio"):
        DiTConfig.testing(null_audio=True, cross_attention=False)
    from configs import dit as dit_configs
    from dithead_jax.training.dit_train import DiTRun

    config = dit_configs.get_config("testing")
    config.diffusion.audio_dropout = 0.1
    with pytest.raises(ConfigError, match=r"config.model.null_audio must be True"):
        DiTRun.from_config(config)
    config.model.null_audio = True
    assert DiTRun.from_config(config).diffusion.audio_dropout == 0.1
    # The paper config is unchanged: no null, no filter, no dropout.
    paper = dit_configs.get_config("L_2")
    assert not paper.model.null_audio and not paper.model.audio_filter
    assert paper.diffusion.audio_dropout == 0.0


# ---------------------------------------------------------------------------------------
# sample.py


def test_sample_refuses_guidance_for_a_run_without_null_audio(tmp_path, monkeypatch, capsys):
    import sample
    from configs import dit as dit_configs
    from dithead_jax import sampling
    from dithead_jax.training.dit_train import DiTRun

    run = DiTRun.from_config(dit_configs.get_config("testing"))
    # Loading a trained run is not what is tested: the refusal reads only its config.
    monkeypatch.setattr(sampling, "load_models", lambda w: types.SimpleNamespace(dit_run=run))
    argv = ["--workdir", str(tmp_path / "run7"), "--eval", "--dataset", str(tmp_path),
            "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--guidance", "1,2.5"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "run7" in err and "guidance 2.5" in err and "null_audio=False" in err
    for bad, why in (("x", "must be a number"), ("-1", ">= 0"), ("2,2", "twice")):
        with pytest.raises(SystemExit):
            sample.main(argv + ["--guidance", bad])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--workdir", "w", "--out", "o.mp4", "--guidance", "1,2"])
    assert "one scale in video mode" in capsys.readouterr().err


def test_eval_scores_every_mode_at_every_scale_and_interpolation(tmp_path, monkeypatch):
    """`--guidance 1,2.5 --interpolate off,half_rate` in the evaluation: each (mode, scale,
    interpolation) reaches the generator with the clip's masks and becomes its own row
    group, named like the --modes rows ("MODE" at 1, "MODE w=W", then " +half_rate")."""
    from dithead_jax import sampling
    from dithead_jax.evaluation import evaluate as ev

    seen = []

    def generate(models, masked, audio, reference, *, mode, guidance, interpolate, masks, **_):
        assert masks.shape == masked.shape[:3]
        seen.append((mode, guidance, interpolate))
        value = 30 * guidance + (mode == "fixed") + 2 * (interpolate == "half_rate")
        return np.full(masked.shape, value, np.uint8)

    monkeypatch.setattr(sampling, "generate_faces", generate)
    monkeypatch.setattr(sampling, "reconstruct_faces", lambda models, frames: frames)
    options = ev.EvalOptions(
        modes=("x0_same_step", "fixed"), guidance=(1.0, 2.5), side_by_side=False, metrics=(),
        interpolate=("off", "half_rate"),
    )  # fmt: skip
    n, size = 3, 16
    frames = np.full((n, size, size, 3), 100, np.uint8)
    mask = np.full((n, size, size), 255, np.uint8)
    audio = np.zeros((n, 11, 33), np.float32)
    clip = ev.Clip("v0", "id", frames, frames * 0, mask, np.zeros((n, 68, 2)), audio, np.arange(n))
    scorers = ev._Scorers(lpips=None, expert=None, fid=None, lse=None)
    scored = ev._score_clip(None, clip, clip.frames[0], np.arange(n), scorers, tmp_path, options)
    groups = ["x0_same_step", "x0_same_step w=2.5", "fixed", "fixed w=2.5"]
    names = [g + vfi for g in groups for vfi in ("", " +half_rate")]
    assert seen == [(m, w, vfi) for m in ("x0_same_step", "fixed") for w in (1.0, 2.5)
                    for vfi in ("off", "half_rate")]  # fmt: skip
    report = ev._report([scored], options, None, "x", "x", False)
    assert list(report["modes"]) == names and [r["mode"] for r in report["clips"]] == names
    assert report["settings"]["guidance"] == "1, 2.5"
    assert report["settings"]["interpolate"] == "off, half_rate"
    # Each group holds its own frames: PSNR of 100 vs 30w (+1 for fixed, +2 half_rate).
    for name, (mode, w, vfi) in zip(names, seen, strict=True):
        value = 30 * w + (mode == "fixed") + 2 * (vfi == "half_rate")
        want = 10 * np.log10(255**2 / (100 - value) ** 2)
        assert report["modes"][name]["psnr"] == pytest.approx(want, rel=1e-4)
    assert report["metrics"]["psnr"] == report["modes"]["x0_same_step"]["psnr"]


# ---------------------------------------------------------------------------------------
# DiffTalk's temporal audio filter


def test_audio_filter_starts_as_the_identity_learns_and_costs_4d2_plus_6d():
    cfg = DiTConfig.testing(depth=1, audio_filter=True)
    graphdef, state = random_state(cfg, seed=1)
    params = nnx.to_pure_dict(state)
    filt = params["context_embedder"]["filter"]
    filt["attn"]["out"] = jax.tree.map(jnp.zeros_like, filt["attn"]["out"])  # as initialised
    nnx.replace_by_pure_dict(state, params)
    plain_cfg = DiTConfig.testing(depth=1)
    plain_graphdef, plain_state = nnx.split(
        nnx.eval_shape(lambda: DiT(plain_cfg, rngs=nnx.Rngs(0)))
    )
    plain = dict(params, context_embedder={
        k: v for k, v in params["context_embedder"].items() if k != "filter"})  # fmt: skip
    nnx.replace_by_pure_dict(plain_state, plain)
    d = cfg.hidden_size
    delta = count_params(nnx.merge(graphdef, state)) - count_params(
        nnx.merge(plain_graphdef, plain_state)
    )
    assert delta == 4 * d * d + 6 * d  # LayerNorm 2D, qkv 3D^2 + 3D, out D^2 + D

    data = batch(2)
    x = dit_step.model_input(data["latent"], data)
    t = jnp.array([100, 800])

    @functools.partial(jax.jit, compiler_options=FAST)
    def loss_and_out(state):
        def loss(state):
            out = nnx.merge(graphdef, state)(x, t, data["audio"])
            return jnp.mean(out**2), out

        return jax.value_and_grad(loss, has_aux=True)(state)

    (_, out), grads = loss_and_out(state)
    plain_out = jax.jit(
        lambda s: nnx.merge(plain_graphdef, s)(x, t, data["audio"]), compiler_options=FAST
    )(plain_state)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain_out))
    # The zero output projection learns first (the rest of the filter waits on it)...
    g = nnx.to_pure_dict(grads)["context_embedder"]["filter"]
    assert np.abs(np.asarray(g["attn"]["out"]["kernel"])).max() > 1e-6
    # ...and once it has moved, every filter parameter gets gradient and the output changes.
    filt["attn"]["out"] = jax.tree.map(lambda a: a + 0.1, filt["attn"]["out"])
    nnx.replace_by_pure_dict(state, params)
    (_, moved), grads = loss_and_out(state)
    g = nnx.to_pure_dict(grads)["context_embedder"]["filter"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert np.abs(np.asarray(leaf)).max() > 1e-7, jax.tree_util.keystr(path)
    assert np.abs(np.asarray(moved) - np.asarray(out)).max() > 1e-4
