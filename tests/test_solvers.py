"""Multistep solvers (dithead_jax/diffusion/solvers.py) against diffusers, and per-slot use.

diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler are the independent
references: both run the whole trajectory of a stand-in model from the same noise, on our
betas and our timesteps, and every step's sample and x0 estimate are compared.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dithead_jax.config import DiffusionConfig
from dithead_jax.diffusion import ddim, solvers
from dithead_jax.diffusion import schedule as sch

SCHEDULE = sch.make_schedule(DiffusionConfig())
T = SCHEDULE.num_timesteps
LATENT = (4, 4, 3)
# Fixed random weights of the stand-in model, shared by the JAX and torch versions.
_W = np.random.default_rng(7)
A = (0.6 + 0.5 * _W.standard_normal(LATENT)).astype(np.float32)
B = _W.standard_normal(LATENT).astype(np.float32)

step = jax.jit(solvers.solver_step, static_argnums=0, static_argnames=("prediction", "clip_x0"))


def model_jax(x: jax.Array, t: jax.Array, prediction: str) -> jax.Array:
    """A deterministic nonlinear "denoiser": it guesses x0 = tanh(a x + b t / 1000) per
    element and outputs the eps or v that guess implies. A bounded x0 keeps trajectories
    O(1) (a raw tanh read as eps puts x0 = (x - sigma eps) / alpha in the hundreds at high
    noise, where a relative tolerance would hide real errors)."""
    x0 = jnp.tanh(x * A + B * (t[:, None, None, None] / 1000.0))
    alpha = SCHEDULE.sqrt_alphas_cumprod[t][:, None, None, None]
    sigma = SCHEDULE.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    eps = (x - alpha * x0) / sigma
    return eps if prediction == "epsilon" else alpha * eps - sigma * x0


def model_torch(x, t: int, prediction: str):
    """`model_jax` in torch."""
    import torch

    x0 = torch.tanh(x * torch.from_numpy(A) + torch.from_numpy(B) * (t / 1000.0))
    alpha = float(SCHEDULE.sqrt_alphas_cumprod[t])
    sigma = float(SCHEDULE.sqrt_one_minus_alphas_cumprod[t])
    eps = (x - alpha * x0) / sigma
    return eps if prediction == "epsilon" else alpha * eps - sigma * x0


def _use_our_alphas_cumprod(ref) -> None:
    """diffusers keeps a float32 cumprod of our (float32-cast) betas and derives sigma from
    it in float32; our tables come from float64. They agree to ~1e-5, but at tau = 0
    (1 - abar = 1e-4) that is ~3e-4 of sigma, enough to move the last step by ~1e-4 with
    this stand-in (|eps| ~ 100 there). Hand it the float64 abar our tables are derived from
    (set_timesteps computes its sigmas from it), so what remains is the solvers' arithmetic."""
    import torch

    ours = np.cumprod(1.0 - sch.make_betas("linear", T))
    np.testing.assert_allclose(ref.alphas_cumprod.numpy(), ours, rtol=2e-5)
    ref.alphas_cumprod = torch.from_numpy(ours)


def diffusers_scheduler(solver: str, prediction: str, timesteps: np.ndarray, spacing: str):
    """The diffusers scheduler for `solver`, on our betas, set to exactly our timesteps."""
    import diffusers

    common = dict(
        num_train_timesteps=T,
        trained_betas=np.asarray(SCHEDULE.betas, np.float64),
        solver_order=2,
        prediction_type="v_prediction" if prediction == "v" else "epsilon",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    dpm = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_type="midpoint", **common
    )
    _use_our_alphas_cumprod(dpm)
    dpm.set_timesteps(timesteps=list(timesteps))  # custom timesteps: DPM-Solver takes them
    if solver == "dpmpp_2m":
        return dpm
    if spacing == "trailing":  # UniPC has no `timesteps=`; its trailing spacing is ours
        ref = diffusers.UniPCMultistepScheduler(
            solver_type="bh2", predict_x0=True, timestep_spacing="trailing", **common
        )
        _use_our_alphas_cumprod(ref)
        ref.set_timesteps(len(timesteps))
    else:
        # No UniPC spacing gives round(linspace(0, T-1, S)): reset its state with any S,
        # then take the timesteps and sigmas diffusers' own custom-timestep path computed.
        ref = diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
        _use_our_alphas_cumprod(ref)
        ref.set_timesteps(len(timesteps))
        ref.timesteps, ref.sigmas = dpm.timesteps.clone(), dpm.sigmas.clone()
    np.testing.assert_array_equal(ref.timesteps.numpy(), timesteps)
    np.testing.assert_allclose(ref.sigmas.numpy(), dpm.sigmas.numpy())
    return ref


@pytest.mark.parametrize("spacing", ["uniform", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_trajectory_matches_diffusers(solver, prediction, spacing):
    """Whole trajectories for S in {5, 10, 20}: every step's x_{k+1} and x0 estimate."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    for num_steps in (5, 10, 20):
        timesteps = ddim.ddim_timesteps(T, num_steps, spacing)
        ref = diffusers_scheduler(solver, prediction, timesteps, spacing)
        taus = jnp.asarray(np.append(timesteps, -1), jnp.int32)
        noise = np.random.default_rng(num_steps).standard_normal((2,) + LATENT, np.float32)
        x, x_ref = jnp.asarray(noise), torch.from_numpy(noise)
        history = tuple(jnp.zeros_like(x) for _ in range(solvers.history_size(solver)))
        for k, t in enumerate(timesteps):
            ks = jnp.full((2,), k, jnp.int32)
            out = model_jax(x, taus[ks], prediction)
            x, x0, history = step(
                solver, SCHEDULE, taus, x, out, ks, history, prediction=prediction
            )
            out_ref = model_torch(x_ref, int(t), prediction)
            x_ref = ref.step(out_ref, int(t), x_ref).prev_sample
            where = f"{solver} {prediction} {spacing} S={num_steps} k={k}"
            # diffusers keeps the data predictions; the newest is step k's x0. From eps at
            # tau = 999, x0 = (x - sigma eps) / alpha cancels with 1 / alpha = 157: ~3e-5.
            np.testing.assert_allclose(
                x0, ref.model_outputs[-1].numpy(), rtol=1e-4, atol=1e-4, err_msg=where
            )
            # The samples themselves agree to a few float32 ulps (max ~4e-6 seen).
            np.testing.assert_allclose(x, x_ref.numpy(), rtol=2e-5, atol=2e-5, err_msg=where)
        # Both finish on sigma = 0 with a first-order step: the sample is the last x0.
        np.testing.assert_array_equal(x, x0)


def _random_inputs(solver: str, num_steps: int, seed: int):
    """Per-step x, model output and history for one slot, from a real trajectory."""
    rng = np.random.default_rng(seed)
    taus = jnp.asarray(np.append(ddim.ddim_timesteps(T, num_steps, "uniform"), -1), jnp.int32)
    x = jnp.asarray(rng.standard_normal((1,) + LATENT, np.float32))
    # Garbage at k = 0 must be ignored: NaN would poison any arithmetic that reads it.
    history = tuple(jnp.full_like(x, jnp.nan) for _ in range(solvers.history_size(solver)))
    steps = []
    for k in range(num_steps):
        ks = jnp.array([k], jnp.int32)
        out = model_jax(x, taus[ks], "v")
        steps.append((x, out, history))
        x, x0, history = step(solver, SCHEDULE, taus, x, out, ks, history, prediction="v")
        steps[-1] += ((x, x0, history),)
    return taus, steps


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_slots_at_different_steps_are_independent(solver):
    """The wavefront's call: M slots at M different k at once == each slot on its own,
    including k = 0 (NaN history), k = 1, the middle and the last step."""
    num_steps = 6
    taus, steps = _random_inputs(solver, num_steps, seed=1)
    order = np.array([5, 0, 3, 1, 4, 2])  # shuffled, so row order is not step order
    x, out, history = (
        jax.tree.map(lambda *rows: jnp.concatenate(rows), *[steps[k][i] for k in order])
        for i in range(3)
    )
    ks = jnp.asarray(order, jnp.int32)
    x_next, x0, new = step(solver, SCHEDULE, taus, x, out, ks, history, prediction="v")
    assert bool(jnp.isfinite(x_next).all())
    for row, k in enumerate(order):
        want_x, want_x0, want_hist = steps[k][3]
        np.testing.assert_allclose(x_next[row], want_x[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x0[row], want_x0[0], rtol=1e-6, atol=1e-6)
        for got, want in zip(new, want_hist, strict=True):
            np.testing.assert_allclose(got[row], want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_traceable_in_a_scan(solver):
    """A lax.scan over k (step and history in the carry) gives the Python loop's sample."""
    num_steps = 6
    taus, steps = _random_inputs(solver, num_steps, seed=2)
    x_init, _, hist_init = steps[0][:3]

    @jax.jit
    def run(x, history):
        def body(carry, k):
            x, history = carry
            ks = jnp.full((1,), k, jnp.int32)
            x, _, history = solvers.solver_step(
                solver, SCHEDULE, taus, x, model_jax(x, taus[ks], "v"), ks, history, prediction="v"
            )
            return (x, history), None

        return jax.lax.scan(body, (x, history), jnp.arange(num_steps))[0][0]

    np.testing.assert_allclose(run(x_init, hist_init), steps[-1][3][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_solver_is_ddim_step(eta):
    taus = jnp.asarray(np.append(ddim.ddim_timesteps(T, 4, "leading"), -1), jnp.int32)
    rng = np.random.default_rng(3)
    x, out, noise = (jnp.asarray(rng.standard_normal((4,) + LATENT, np.float32)) for _ in "abc")
    ks = jnp.array([2, 0, 3, 1], jnp.int32)
    got = solvers.solver_step(
        "ddim", SCHEDULE, taus, x, out, ks, (), prediction="epsilon", eta=eta, noise=noise
    )
    want = solvers.ddim_step(SCHEDULE, x, taus[ks], taus[ks + 1], out, "epsilon", eta, noise)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == ()


def test_bad_arguments():
    taus = jnp.array([500, 0, -1], jnp.int32)
    x = jnp.zeros((1,) + LATENT)
    call = functools.partial(
        solvers.solver_step,
        schedule=SCHEDULE,
        taus=taus,
        x=x,
        model_output=x,
        step=jnp.zeros((1,), jnp.int32),
        prediction="epsilon",
    )
    for solver in ("dpmpp_2m", "unipc"):
        history = (x,) * solvers.history_size(solver)
        with pytest.raises(ValueError, match="eta must be 0"):
            call(solver, history=history, eta=0.5)
        with pytest.raises(ValueError, match="eta must be 0"):  # traced: cannot be checked
            jax.jit(lambda e, s=solver, h=history: call(s, history=h, eta=e))(0.0)
        with pytest.raises(ValueError, match="history"):
            call(solver, history=())
    with pytest.raises(ValueError, match="needs `noise`"):
        call("ddim", history=(), eta=0.3)
    with pytest.raises(ValueError, match=r"unknown solver 'heun'.*ddim.*dpmpp_2m.*unipc"):
        call("heun", history=())
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.history_size("euler")
    assert [solvers.history_size(s) for s in solvers.SOLVERS] == [0, 1, 3]
