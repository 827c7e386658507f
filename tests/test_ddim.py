"""DDIM sampling with a progressive reference (dithead_jax/diffusion/ddim.py).

Two kinds of denoiser:
* an analytic oracle whose x0 estimate is a known function of its inputs (so the sampler's
  plumbing and every reference mode have a closed-form answer);
* the tiny `DiTConfig.testing()` DiT with every parameter perturbed (a fresh DiT outputs
  zeros and ignores audio), for "wavefront == nested" on a real network.
Sampler variants are compiled once each (static options, eta traced). Where the answer
does not depend on the noise, keys are "rbg": a threefry `normal` takes seconds to compile
on this CPU. Where orders are compared, keys are threefry: rbg is not vmap-invariant.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dithead_jax.config import DiffusionConfig, DiTConfig
from dithead_jax.diffusion import ddim, solvers
from dithead_jax.diffusion import schedule as sch
from dithead_jax.diffusion.sampler import DiTSampler, SamplerOptions
from dithead_jax.models.dit import DiT

SCHEDULE = sch.make_schedule(DiffusionConfig())
C = 3
# Jitted, because eager dispatch compiles every op on its own (slow on this CPU).
ddim_step = jax.jit(solvers.ddim_step, static_argnums=5, static_argnames="clip_x0")


def fast_key(seed: int) -> jax.Array:
    """For runs whose answer does not depend on the noise (see the module docstring)."""
    return jax.random.key(seed, impl="rbg")


rbg_warning = pytest.mark.filterwarnings("ignore:rbg keys are not vmap-invariant")


# ---------------------------------------------------------------------------------------
# Timesteps and one step


def test_timestep_spacings():
    leading = ddim.ddim_timesteps(1000, 50, "leading")
    np.testing.assert_array_equal(leading, np.arange(980, -1, -20))
    # ADM's "ddim250": range(0, 1000, 4).
    np.testing.assert_array_equal(ddim.ddim_timesteps(1000, 250, "leading"), np.arange(996, -1, -4))
    trailing = ddim.ddim_timesteps(1000, 50, "trailing")
    np.testing.assert_array_equal(trailing, np.arange(999, 0, -20))
    uniform = ddim.ddim_timesteps(1000, 250, "uniform")
    assert uniform[0] == 999 and uniform[-1] == 0
    assert np.abs(np.diff(uniform) + 999 / 249).max() <= 1
    for spacing in ("uniform", "leading", "trailing"):
        for steps in (1, 2, 7, 25, 250, 333, 999, 1000):
            ts = ddim.ddim_timesteps(1000, steps, spacing)
            assert ts.dtype == np.int32 and ts.shape == (steps,)
            assert (np.diff(ts) < 0).all() and ts[-1] >= 0 and ts[0] <= 999
        np.testing.assert_array_equal(
            ddim.ddim_timesteps(1000, 1000, spacing), np.arange(999, -1, -1)
        )
    with pytest.raises(ValueError):
        ddim.ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        ddim.ddim_timesteps(1000, 10, "quadratic")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_step_with_true_noise_lands_on_the_forward_process(prediction):
    """Given the true eps (or v), an eta=0 step maps q(x_t|x0) exactly onto q(x_s|x0)."""
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((4, 8, 8, C), np.float32))
    eps = jnp.asarray(rng.standard_normal(x0.shape, np.float32))
    t = jnp.array([999, 500, 20, 3])
    t_prev = jnp.array([900, 250, -1, 0])
    x_t = sch.q_sample(SCHEDULE, x0, t, eps)
    out = sch.target_for(prediction, SCHEDULE, x0, eps, t)
    x_prev, x0_pred = ddim_step(SCHEDULE, x_t, t, t_prev, out, prediction, 0.0, eps * 0)
    np.testing.assert_allclose(x0_pred, x0, atol=2e-3)  # 1/sqrt(abar_999) ~ 157 x f32 eps
    expected = sch.q_sample(SCHEDULE, x0, jnp.maximum(t_prev, 0), eps)
    expected = expected.at[2].set(x0[2])  # t_prev = -1: the clean sample itself
    np.testing.assert_allclose(x_prev, expected, atol=2e-4)


def test_ddim_step_eta_one_matches_ddpm_posterior_variance():
    x = jnp.zeros((1, 2, 2, C))
    noise = jnp.ones_like(x)
    for t in (999, 400, 1):
        tt = jnp.array([t])
        # sigma is the (rescaled) noise term: read it off with zero x0 and zero eps.
        x_prev, _ = ddim_step(SCHEDULE, x, tt, tt - 1, x, "epsilon", 1.0, noise)
        sigma2 = float(x_prev[0, 0, 0, 0]) ** 2
        assert sigma2 == pytest.approx(
            float(SCHEDULE.posterior_variance[t]), rel=1e-3
        )  # f32: 1 - abar_t / abar_prev


def test_clip_x0():
    x0 = jnp.full((1, 2, 2, C), 3.0)
    eps = jnp.zeros_like(x0)
    t = jnp.array([500])
    x_t = sch.q_sample(SCHEDULE, x0, t, eps)
    _, x0_pred = ddim_step(SCHEDULE, x_t, t, t - 100, eps, "epsilon", 0.0, eps, clip_x0=1.0)
    np.testing.assert_allclose(x0_pred, 1.0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_step_with_eta_matches_diffusers(prediction):
    """eta > 0 against an independent implementation: diffusers' DDIMScheduler, step by step
    along a 50-step "leading" chain down to t_prev = -1 (abar = 1), with the same x_t, a
    non-zero stand-in model output and the same variance noise fed to both."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    steps = 50
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=SCHEDULE.num_timesteps,
        trained_betas=np.asarray(SCHEDULE.betas, np.float64),
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="v_prediction" if prediction == "v" else "epsilon",
    )
    ref.set_timesteps(steps)
    ts = ddim.ddim_timesteps(SCHEDULE.num_timesteps, steps, "leading")
    np.testing.assert_array_equal(ref.timesteps.numpy(), ts)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, C)).astype(np.float32)
    for k, t in enumerate(ts):
        t_prev = ts[k + 1] if k + 1 < steps else -1
        # Depends on x and t, so eps/v are far from 0 and differ per step.
        out = (0.8 * np.tanh(x) + 0.3 * np.cos(t / 90.0)).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        for eta in (0.3, 1.0):
            want = ref.step(
                torch.from_numpy(out),
                int(t),
                torch.from_numpy(x),
                eta=eta,
                variance_noise=torch.from_numpy(noise),
            )
            tt = jnp.full((2,), t, jnp.int32)
            got, x0 = ddim_step(
                SCHEDULE, x, tt, jnp.full_like(tt, t_prev), out, prediction, eta, noise
            )
            np.testing.assert_allclose(x0, want.pred_original_sample.numpy(), rtol=1e-4, atol=2e-5)
            np.testing.assert_allclose(got, want.prev_sample.numpy(), rtol=1e-4, atol=2e-5)
        x = want.prev_sample.numpy()


# ---------------------------------------------------------------------------------------
# Whole samplers


def clip_inputs(b: int, n: int, size: int, seed: int = 0):
    """masked (B, N, h, w, C), audio (B, N, 11, 33), first reference (B, h, w, C)."""
    rng = np.random.default_rng(seed)
    masked = rng.standard_normal((b, n, size, size, C), np.float32)
    audio = rng.standard_normal((b, n, 11, 33), np.float32)
    first = rng.standard_normal((b, size, size, C), np.float32)
    return jnp.asarray(masked), jnp.asarray(audio), jnp.asarray(first)


def oracle(x: jax.Array, t: jax.Array, audio: jax.Array) -> jax.Array:
    """A denoiser that is certain x0 = reference + masked (inputs [z_t, z_m, z_r])."""
    z_t, z_m, z_r = jnp.split(x, 3, axis=-1)
    return sch.predict_eps_from_x0(SCHEDULE, z_t, t, z_m + z_r)


@functools.partial(jax.jit, static_argnames=("mode", "order", "steps", "spacing"))
def run_oracle(masked, audio, first, rng, eta, *, mode, order, steps=6, spacing="uniform"):
    return ddim.sample_video(
        oracle, SCHEDULE, masked, audio, first, rng,
        num_steps=steps, eta=eta, mode=mode, order=order, spacing=spacing,
    )  # fmt: skip


@rbg_warning
def test_a_python_float_eta_above_zero_still_draws_step_noise():
    """eta given as a Python number (static, not traced) skips the noise draw only at 0.
    With a zero-eps model the eta = 0 chain is x0 = x_T / sqrt(abar_T) rescaled, and only
    the step noise can make eta = 1 differ from it (same key, same initial noise)."""
    masked, audio, first = clip_inputs(1, 2, 4)

    def zero_eps(x, t, audio):
        return jnp.zeros_like(x[..., :C])

    @functools.partial(jax.jit, static_argnums=0)
    def run(eta):
        return ddim.sample_video(
            zero_eps, SCHEDULE, masked, audio, first, fast_key(1),
            num_steps=3, eta=eta, mode="fixed", order="parallel", spacing="uniform",
        )  # fmt: skip

    assert float(jnp.abs(run(1.0) - run(0.0)).max()) > 1e-2


@rbg_warning
def test_reference_semantics_in_closed_form():
    """With the oracle, x0 modes give cumulative sums; fixed gives z_r0 + z_m per frame."""
    masked, audio, first = clip_inputs(2, 5, 4)
    cumulative = first[:, None] + jnp.cumsum(masked, axis=1)
    fixed = first[:, None] + masked
    cases = [
        ("x0_same_step", "wavefront", cumulative),
        ("final", "nested", cumulative),
        ("fixed", "parallel", fixed),
    ]
    for eta in (0.0, 0.7):
        for mode, order, expected in cases:
            out = run_oracle(masked, audio, first, fast_key(3), eta, mode=mode, order=order)
            np.testing.assert_allclose(out, expected, atol=1e-3, err_msg=f"{mode}/{order}")
        # noisy_same_step: frame i's last step sees x_{i-1} at tau_{S-1} (166 with trailing
        # spacing), still noisy, so the answer is not the clean cumulative sum.
        out = run_oracle(
            masked, audio, first, fast_key(3), eta,
            mode="noisy_same_step", order="nested", spacing="trailing",
        )  # fmt: skip
        np.testing.assert_allclose(out[:, 0], fixed[:, 0], atol=1e-3)
        assert np.abs(np.asarray(out[:, 1:] - cumulative[:, 1:])).max() > 0.1


def count_calls():
    """A model_fn that records the batch of every call that actually runs (jit and loops)."""
    batches: list[int] = []

    def model_fn(x, t, audio):
        jax.debug.callback(lambda t: batches.append(t.shape[0]), t)
        return jnp.zeros(x.shape[:-1] + (C,), x.dtype)

    return model_fn, batches


@rbg_warning
def test_number_of_model_calls():
    b = 2
    cases = [
        (5, 3, "nested", "final"),
        (5, 3, "wavefront", "x0_same_step"),
        (3, 5, "wavefront", "noisy_same_step"),
        (5, 3, "parallel", "fixed"),
    ]
    for n, steps, order, mode in cases:
        masked, audio, first = clip_inputs(b, n, 2)
        model_fn, batches = count_calls()
        sample = functools.partial(
            ddim.sample_video, model_fn, SCHEDULE, num_steps=steps, mode=mode, order=order
        )
        jax.block_until_ready(jax.jit(sample)(masked, audio, first, fast_key(0)))
        jax.effects_barrier()
        info = ddim.dit_calls_per_clip(order, n, steps)
        assert len(batches) == ddim.num_model_calls(order, n, steps) == info["calls"]
        assert set(batches) == {b * info["slots_per_call"]}, order
    assert ddim.num_model_calls("wavefront", 100, 25) == 124
    assert ddim.num_model_calls("nested", 100, 25) == 2500


def test_non_threefry_keys_warn():
    masked, audio, first = clip_inputs(1, 2, 2)
    model_fn = lambda x, t, a: x[..., :C]
    with pytest.warns(UserWarning, match="vmap-invariant"):
        jax.eval_shape(
            lambda: ddim.sample_video(model_fn, SCHEDULE, masked, audio, first, fast_key(0),
                                      num_steps=2)
        )  # fmt: skip


def test_orders_and_modes_are_checked():
    assert ddim.resolve_order("x0_same_step") == "wavefront"
    assert ddim.resolve_order("noisy_same_step") == "parallel"
    assert ddim.resolve_order("final") == "nested"
    with pytest.raises(ValueError):
        ddim.resolve_order("final", "wavefront")
    with pytest.raises(ValueError):
        ddim.resolve_order("x0_same_step", "parallel")
    with pytest.raises(ValueError):
        ddim.resolve_order("previous")


# ---------------------------------------------------------------------------------------
# A real (tiny) DiT


@functools.cache
def tiny_dit():
    """(graphdef, state, cfg) of a one-block testing DiT with every parameter ~ N(0, 0.1^2)
    (LayerNorm scales 1 + N(0, 0.1^2)): a fresh DiT's zero-initialised output projections
    would make it output zeros and ignore the audio. Filled from numpy: a jitted random
    init costs ~10 s of compile on this CPU."""
    cfg = DiTConfig.testing(depth=1)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        value = 0.1 * rng.standard_normal(leaf.shape)
        value += 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(value, leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract), cfg


@functools.partial(jax.jit, static_argnames=("mode", "order", "steps"))
def run_dit(state, masked, audio, first, rng, eta, *, mode, order, steps=4):
    model = nnx.merge(tiny_dit()[0], state)
    return ddim.sample_video(
        model, SCHEDULE, masked, audio, first, rng,
        num_steps=steps, eta=eta, mode=mode, order=order,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dit_clip():
    _, state, cfg = tiny_dit()
    masked, audio, first = clip_inputs(2, 5, cfg.input_size, seed=1)
    return state, masked, audio, first


def test_perturbed_dit_listens_to_audio(dit_clip):
    state, masked, audio, first = dit_clip
    x = jnp.concatenate([masked[:, 0], masked[:, 1], first], axis=-1)
    t = jnp.array([500, 500])
    forward = jax.jit(lambda state, a: nnx.merge(tiny_dit()[0], state)(x, t, a))
    assert (
        np.abs(np.asarray(forward(state, audio[:, 0]) - forward(state, audio[:, 1]))).max() > 1e-3
    )


@pytest.mark.parametrize("mode", ["x0_same_step", "noisy_same_step"])
def test_wavefront_equals_nested_loop(dit_clip, mode):
    state, masked, audio, first = dit_clip
    rng = jax.random.key(7)
    orders = ["nested", "wavefront"] + (["parallel"] if mode == "noisy_same_step" else [])
    for eta in (0.0, 0.8):
        outs = {o: run_dit(state, masked, audio, first, rng, eta, mode=mode, order=o)
                for o in orders}  # fmt: skip
        nested = np.asarray(outs["nested"])
        assert np.isfinite(nested).all() and nested.std() > 0.1
        scale = np.abs(nested).max()
        for order in orders[1:]:
            np.testing.assert_allclose(
                outs[order], nested, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{order} eta={eta}"
            )


def test_final_mode_through_the_dit_sampler_and_seeds(dit_clip):
    """The jitted NNX entry point with DiffTalk's mode; seeds decide the video."""
    graphdef, state, _ = tiny_dit()
    _, masked, audio, first = dit_clip
    options = SamplerOptions(num_steps=4, mode="final")
    sampler = DiTSampler(nnx.merge(graphdef, state), SCHEDULE, options)
    final = np.asarray(sampler(masked, audio, first, jax.random.key(7))[0])
    assert final.shape == masked.shape and np.isfinite(final).all()
    scale = np.abs(final).max()
    # Frame 0 sees z_r0 in every mode, with the same noise; later frames see other refs.
    x0_mode = run_dit(
        state, masked, audio, first, jax.random.key(7), 0.0, mode="x0_same_step", order="nested"
    )
    np.testing.assert_allclose(final[:, 0], x0_mode[:, 0], rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(final[:, 1:] - np.asarray(x0_mode[:, 1:])).max() > 1e-3 * scale
    # Same seed, same video (eta > 0 too); another seed, another video.
    for eta in (0.0, 0.8):
        again = [
            run_dit(state, masked, audio, first, jax.random.key(seed), eta,
                    mode="x0_same_step", order="nested")
            for seed in (7, 7, 8)
        ]  # fmt: skip
        np.testing.assert_array_equal(again[0], again[1])
        assert np.abs(np.asarray(again[0] - again[2])).max() > 1e-3
