"""Noise schedules and forward-process math (dithead_jax/diffusion/schedule.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dithead_jax.config import DiffusionConfig
from dithead_jax.diffusion import schedule as sch


@pytest.fixture(scope="module")
def adm():
    return sch.make_schedule(DiffusionConfig())


def test_adm_linear_betas_endpoints():
    betas = sch.make_betas("linear", 1000, 1e-4, 0.02)
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.all(np.diff(betas) > 0)
    # ADM rescales the endpoints by 1000/T so a shorter chain covers the same process.
    short = sch.make_betas("linear", 250, 1e-4, 0.02)
    # The defaults are ADM's endpoints, the config's.
    d = DiffusionConfig()
    np.testing.assert_array_equal(
        sch.make_betas("linear", 1000), sch.make_betas("linear", 1000, d.beta_start, d.beta_end)
    )
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_alphas_cumprod_known_values_and_monotonic():
    linear = sch.make_schedule(DiffusionConfig())
    # Published figures: ADM linear ends at abar_T ~ 4.04e-5; Stable Diffusion's
    # scaled_linear (0.00085 .. 0.012) at sqrt(abar_T) ~ 0.0683 (Lin et al., 2023).
    assert float(linear.alphas_cumprod[-1]) == pytest.approx(4.04e-5, rel=1e-2)
    ldm = sch.make_schedule(
        DiffusionConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )
    assert float(ldm.sqrt_alphas_cumprod[-1]) == pytest.approx(0.0683, rel=1e-2)
    cosine = sch.make_schedule(DiffusionConfig(schedule="cosine"))
    assert float(cosine.betas.max()) <= 0.999 + 1e-6
    for s in (linear, ldm, cosine):
        abar = np.asarray(s.alphas_cumprod, np.float64)
        assert s.num_timesteps == 1000
        assert np.all(np.diff(abar) < 0) and 0 < abar[-1] < abar[0] < 1
        np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
        np.testing.assert_allclose(
            s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, 1.0, atol=1e-6
        )
        assert np.all(np.isfinite(np.asarray(s.posterior_log_variance_clipped)))
    with pytest.raises(ValueError):
        sch.make_betas("quadratic", 10)


def test_q_sample_statistics(adm):
    n, steps = 20_000, (0, 100, 500, 999)
    x0 = jnp.full((len(steps), n, 4), 0.7)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    t = jnp.asarray(steps)
    z = np.asarray(jax.jit(sch.q_sample)(adm, x0, t, noise))
    for i, step in enumerate(steps):
        abar = float(adm.alphas_cumprod[step])
        assert z[i].mean() == pytest.approx(np.sqrt(abar) * 0.7, abs=0.01)
        assert z[i].std() == pytest.approx(np.sqrt(1 - abar), rel=0.02, abs=1e-3)


def _batch(shape=(8, 6, 6, 3), seed=0):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.normal(k0, shape)
    noise = jax.random.normal(k1, shape)
    t = jax.random.randint(k2, (shape[0],), 0, 1000).at[:2].set(jnp.array([0, 999]))
    return x0, noise, t


def test_eps_x0_round_trip(adm):
    x0, noise, t = _batch()

    @jax.jit
    def run(adm, x0, noise, t):
        x_t = sch.q_sample(adm, x0, t, noise)
        return (
            sch.predict_x0_from_eps(adm, x_t, t, noise),
            sch.predict_eps_from_x0(adm, x_t, t, x0),
            *sch.to_x0_and_eps("epsilon", adm, x_t, t, noise),
        )

    x0_hat, eps_hat, x0_hat2, eps_same = run(adm, x0, noise, t)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-4)
    np.testing.assert_allclose(x0_hat2, x0, atol=2e-4)
    np.testing.assert_array_equal(eps_same, noise)


def test_v_prediction_round_trip(adm):
    x0, noise, t = _batch(seed=1)

    @jax.jit
    def run(adm, x0, noise, t):
        x_t = sch.q_sample(adm, x0, t, noise)
        v = sch.target_for("v", adm, x0, noise, t)
        return (
            v,
            sch.v_from_eps(adm, x0, t, noise),
            sch.predict_x0_from_v(adm, x_t, t, v),
            sch.predict_eps_from_v(adm, x_t, t, v),
            *sch.to_x0_and_eps("v", adm, x_t, t, v),
            sch.target_for("epsilon", adm, x0, noise, t),
        )

    v, v2, x0_hat, eps_hat, x0_hat2, eps_hat2, eps_target = run(adm, x0, noise, t)
    np.testing.assert_allclose(v, v2)
    for got, want in ((x0_hat, x0), (eps_hat, noise), (x0_hat2, x0), (eps_hat2, noise)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # At t = 0 v is almost exactly the noise, at t = T-1 almost exactly -x0.
    np.testing.assert_allclose(v[0], noise[0], atol=0.05)
    np.testing.assert_allclose(v[1], -x0[1], atol=0.05)
    np.testing.assert_array_equal(eps_target, noise)


def test_training_loss_oracle_and_zero_model(adm):
    x0 = jax.random.normal(jax.random.key(2), (16, 4, 4, 3))

    def oracle(prediction):
        def model_fn(x_t, t):
            # Knows x0, hence the exact noise: recovers the target up to float error.
            eps = sch.predict_eps_from_x0(adm, x_t, t, x0)
            return eps if prediction == "epsilon" else sch.v_from_eps(adm, x0, t, eps)

        return model_fn

    def zeros(x_t, t):
        # A learned-sigma output (2C channels): only the first C enter the loss.
        return jnp.zeros(x_t.shape[:-1] + (6,))

    @jax.jit
    def run(rng):
        return (
            sch.training_loss(oracle("epsilon"), adm, x0, rng, "epsilon"),
            sch.training_loss(oracle("v"), adm, x0, rng, "v"),
            sch.training_loss(zeros, adm, x0, rng, "epsilon")[0],
        )

    (eps_loss, aux), (v_loss, _), zero_loss = run(jax.random.key(3))
    assert float(eps_loss) < 1e-5 and float(v_loss) < 1e-5
    assert aux["t"].shape == (16,) and aux["loss_per_example"].shape == (16,)
    assert int(aux["t"].min()) >= 0 and int(aux["t"].max()) < 1000
    # A zero eps-model costs E[eps^2] = 1.
    assert float(zero_loss) == pytest.approx(1.0, abs=0.15)


def test_training_loss_weights_each_element(adm):
    x0 = jax.random.normal(jax.random.key(4), (4, 4, 4, 3))
    error = jax.random.normal(jax.random.key(5), x0.shape)

    def off_by_error(x_t, t):
        # The exact noise plus a known error: the loss is a weighted mean of error^2,
        # whatever t and noise were drawn.
        return sch.predict_eps_from_x0(adm, x_t, t, x0) + error

    alpha = jnp.zeros((4, 4, 4)).at[:, 2:].set(1.0)  # the lower half of every example
    weights = 1.0 + 3.0 * alpha[..., None]
    loss, aux = jax.jit(
        lambda rng: sch.training_loss(off_by_error, adm, x0, rng, "epsilon", weights=weights)
    )(jax.random.key(6))
    want = np.mean(np.asarray(weights) * np.square(np.asarray(error)), axis=(1, 2, 3))
    np.testing.assert_allclose(aux["loss_per_example"], want, rtol=1e-4)
    assert float(loss) == pytest.approx(float(want.mean()), rel=1e-4)


def test_diffusion_loss_and_gradient():
    pred = jnp.ones((2, 3, 3, 3))
    target = jnp.zeros((2, 3, 3, 3))
    loss, grad = jax.jit(jax.value_and_grad(sch.diffusion_loss))(pred, target)
    assert float(loss) == pytest.approx(1.0)
    np.testing.assert_allclose(grad, 2.0 / pred.size)
    assert jax.eval_shape(sch.diffusion_loss, pred.astype(jnp.bfloat16), target).dtype == (
        jnp.float32
    )


def test_posterior_is_the_eta_one_ddim_step(adm):
    """q(x_{t-1} | x_t, x0) (DDPM, Ho et al. Eq. 7): its mean coefficients and variance equal
    the eta = 1 DDIM step's from t to t - 1 written with x_t = sqrt(abar) x0 + sqrt(1-abar) eps
    (Song et al. Eq. 12), an independent derivation."""
    t = np.array([1, 2, 10, 400, 999])
    abar = np.asarray(adm.alphas_cumprod, np.float64)[t]
    prev = np.asarray(adm.alphas_cumprod, np.float64)[t - 1]
    var = np.asarray(adm.posterior_variance, np.float64)[t]
    np.testing.assert_allclose(var, (1 - prev) / (1 - abar) * (1 - abar / prev), rtol=1e-3)
    c1 = np.asarray(adm.posterior_mean_coef1, np.float64)[t]
    c2 = np.asarray(adm.posterior_mean_coef2, np.float64)[t]
    # x0 and eps coefficients of c1 x0 + c2 x_t vs sqrt(prev) x0 + sqrt(1 - prev - var) eps
    # (1e-3: abar / prev is within 1e-4 of 1 at t = 1 in float32).
    np.testing.assert_allclose(c1 + c2 * np.sqrt(abar), np.sqrt(prev), rtol=1e-5)
    np.testing.assert_allclose(c2 * np.sqrt(1 - abar), np.sqrt(1 - prev - var), rtol=1e-3)
    # Its log, with t = 0 (variance 0) borrowing t = 1's value as ADM does.
    log_var = np.asarray(adm.posterior_log_variance_clipped)
    full = np.asarray(adm.posterior_variance, np.float64)
    assert log_var.shape == (1000,)
    np.testing.assert_allclose(log_var, np.log(np.append(full[1], full[1:])), rtol=1e-5)


def test_sample_timesteps_cover_every_step_uniformly():
    t = np.asarray(sch.sample_timesteps(jax.random.key(0), 20_000, 10))
    assert t.dtype == np.int32 and t.shape == (20_000,)
    counts = np.bincount(t, minlength=10)
    assert len(counts) == 10 and counts.min() > 1800  # 2000 expected each, t = 0 included


def test_cosine_betas_match_diffusers_and_betas_of_one_are_allowed():
    """Cosine (Nichol & Dhariwal) against diffusers' "squaredcos_cap_v2", an independent
    implementation; a final beta of exactly 1 (zero terminal SNR) is a valid schedule."""
    diffusers = pytest.importorskip("diffusers")
    want = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(
        sch.make_betas("cosine", 1000), want.betas.numpy().astype(np.float64), rtol=1e-5
    )
    zero_snr = sch.Schedule.from_betas(np.array([0.1, 0.5, 1.0]))
    assert float(zero_snr.alphas_cumprod[-1]) == 0.0
    for bad in ([0.1, 0.0], [0.1, 1.5], [[0.1]]):
        with pytest.raises(ValueError, match="betas"):
            sch.Schedule.from_betas(np.array(bad))
