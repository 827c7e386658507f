"""Multistep ODE solvers for the DDIM chain, as pure per-slot update functions.

Notation (as in `ddim.py`). Step k = 0..S-1 moves a latent from tau_k to tau_{k+1}, with
tau_S = -1 meaning "clean" (abar = 1). With alpha = sqrt(abar), sigma = sqrt(1 - abar),

    lambda_k = log(alpha_k / sigma_k)       half the log-SNR at tau_k (+inf at tau_S)
    h_k      = lambda_{k+1} - lambda_k > 0  the step in lambda (+inf for the last step)
    m_k      = x0 estimate at step k        the "data prediction" every solver here uses

Written in lambda, the probability-flow ODE has the exact solution
x_{k+1} = (sigma_{k+1} / sigma_k) x_k + sigma_{k+1} * int_{lambda_k}^{lambda_{k+1}}
e^lambda x0(lambda) dlambda, and the solvers differ in how they approximate x0(lambda):

ddim      x0 constant (= m_k) over the step: the first-order update
              x_{k+1} = (sigma_{k+1} / sigma_k) x_k + alpha_{k+1} (1 - e^{-h_k}) m_k   (1)
          which is exactly DDIM with eta = 0. `ddim_step` (below) is it, with eta.

dpmpp_2m  DPM-Solver++(2M) (Lu et al., 2022), "midpoint" form: x0 linear in lambda through
          the last two data predictions. With r_k = h_{k-1} / h_k,
              D_k = m_k + (m_k - m_{k-1}) / (2 r_k),  then (1) with D_k in place of m_k.
          First order at k = 0 (no m_{-1}) and at k = S-1: the last step goes to sigma = 0,
          where (1) gives x_S = m_{S-1} exactly (diffusers' final_sigmas_type="zero" makes
          its last step first order for any S; lower_order_final then changes nothing else
          at order 2). State carried from step k-1: m_{k-1}.

unipc     UniPC (Zhao et al., 2023), bh2, order 2, data prediction. Step k first corrects
          x_k (UniC), then predicts x_{k+1} from the corrected x_k^c (UniP):
          UniC re-takes step k-1 from x_{k-1}^c, now that m_k (the model at the predicted,
          uncorrected x_k) is known. With B(h) = expm1(-h) (bh2),
              x_k^c = (sigma_k / sigma_{k-1}) x_{k-1}^c - alpha_k B(h_{k-1}) m_{k-1}
                      - alpha_k B(h_{k-1}) [rho_1 (m_{k-2} - m_{k-1}) / r + rho_2 (m_k - m_{k-1})]
          with r = (lambda_{k-2} - lambda_{k-1}) / h_{k-1} and (rho_1, rho_2) solving
              rho_1 + rho_2 = b_1,  r rho_1 + rho_2 = b_2,
              b_i = i! (-h) phi_{i+1}(-h) / B(h),  phi_1(z) = expm1(z)/z,
              phi_{j+1}(z) = (phi_j(z) - 1/j!) / z.
          At k = 1 UniC is first order (only rho_2 = 1/2); at k = 0 there is nothing to
          correct. UniP-2 with bh2 (rho_p = 1/2) coincides with the 2M update above, applied
          to x_k^c, and is first order at k = 0 and k = S-1 (order min(2, S-k, k+1), as
          diffusers' lower_order_final). The model is never evaluated at x_k^c: m_k comes
          from the uncorrected x_k, which is also what the caller feeds the model.
          State carried from step k-1: (x_{k-1}^c, m_{k-1}, m_{k-2}).

Why the history is per frame, passed in and out: the wavefront order runs frame i at step
k while frame i+1 is at step k-1, in one batched call. A solver object holding "the last
model outputs" (diffusers' design) cannot serve rows at different steps, so every quantity
here is a function of the row's own step index (orders, lambdas, "first"/"last" flags via
gathers on `taus` and `jnp.where`, never Python branches on k) and each frame's previous
data predictions travel with that frame, next to its latent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dithead_jax.diffusion.schedule import Prediction, Schedule, to_x0_and_eps

Array = jax.Array

SOLVERS: tuple[str, ...] = ("ddim", "dpmpp_2m", "unipc")
_HISTORY = {"ddim": 0, "dpmpp_2m": 1, "unipc": 3}


def _alpha_bar(schedule: Schedule, t: Array, like: Array) -> Array:
    """abar_t for (M,) timesteps where t = -1 means abar = 1, shaped to broadcast on `like`."""
    t = jnp.asarray(t, jnp.int32)
    abar = jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)
    return abar.reshape(abar.shape + (1,) * (like.ndim - abar.ndim)).astype(like.dtype)


def ddim_step(
    schedule: Schedule,
    x_t: Array,
    t: Array,
    t_prev: Array,
    model_output: Array,
    prediction: Prediction,
    eta: float | Array,
    noise: Array,
    clip_x0: float | None = None,
) -> tuple[Array, Array]:
    """One DDIM update x_t -> x_{t_prev} (Song et al., 2021, Eq. 12).

    x_t, model_output, noise: (M, ...); t, t_prev: (M,) int, t_prev = -1 for the last step.
    Returns (x_{t_prev}, x0_pred). eta = 0 is deterministic; eta = 1 is DDPM's posterior
    variance for the skipped chain. With `clip_x0`, x0_pred is clamped to [-c, c] and eps
    re-derived from it, as ADM does (off by default: VQGAN latents are not in [-1, 1]).
    """
    x0, eps = to_x0_and_eps(prediction, schedule, x_t, t, model_output)
    abar_t = _alpha_bar(schedule, t, x_t)
    abar_prev = _alpha_bar(schedule, t_prev, x_t)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * jnp.sqrt(1.0 - abar_t / abar_prev)
    # max(., 0) guards eta > 1 and float round-off at abar_prev = 1.
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    x_prev = jnp.sqrt(abar_prev) * x0 + direction + sigma * noise
    return x_prev, x0


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")


def history_size(solver: str) -> int:
    """How many (M, *latent) arrays of per-frame history the solver carries between one
    frame's consecutive steps (0 for ddim).

    dpmpp_2m: (m_{k-1},). unipc: (x_{k-1}^c, m_{k-1}, m_{k-2}). See the module docstring.
    """
    _check_solver(solver)
    return _HISTORY[solver]


def _is_zero(eta: float | Array) -> bool:
    """True for a concrete eta == 0; False for a non-zero or a traced (unknowable) eta."""
    try:
        return not bool(np.any(np.asarray(eta) != 0))
    except jax.errors.TracerArrayConversionError:
        return False


def _per_slot(v: Array, like: Array) -> Array:
    """(M,) -> (M, 1, ..., 1) to broadcast over `like`."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _where(cond: Array, a: Array, b: Array | float) -> Array:
    """Per-slot select on whole arrays, so NaN/inf in the unused branch cannot leak (the
    history is garbage at k = 0, and some coefficients are infinite where unused)."""
    return jnp.where(_per_slot(cond, a), a, b)


def _alpha_sigma_lambda(schedule: Schedule, taus: Array, index: Array):
    """alpha, sigma, lambda (each (M,) float32) at taus[index], with index clipped into
    [0, S]; callers mask the values of out-of-range indices. tau = -1 gives (1, 0, +inf)."""
    t = taus[jnp.clip(index, 0, taus.shape[0] - 1)]
    clean, t = t < 0, jnp.maximum(t, 0)
    # The float64-derived tables, as `to_x0_and_eps` uses: rounding abar to float32 first
    # moves 1 - abar (1e-4 at t = 0) by up to 3e-4 of itself.
    alpha = jnp.where(clean, 1.0, schedule.sqrt_alphas_cumprod[t]).astype(jnp.float32)
    sigma = jnp.where(clean, 0.0, schedule.sqrt_one_minus_alphas_cumprod[t]).astype(jnp.float32)
    return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


def _predict(schedule: Schedule, taus: Array, step: Array, x: Array, m0: Array, m1: Array) -> Array:
    """The 2M / UniP-2 (bh2) update from x at tau_k to tau_{k+1} with data predictions
    m0 = m_k and m1 = m_{k-1}: second order for 1 <= k <= S-2, first order otherwise."""
    s = taus.shape[0] - 1
    _, sig_k, lam_k = _alpha_sigma_lambda(schedule, taus, step)
    a_next, sig_next, lam_next = _alpha_sigma_lambda(schedule, taus, step + 1)
    _, _, lam_prev = _alpha_sigma_lambda(schedule, taus, step - 1)
    second = (step >= 1) & (step <= s - 2)
    h = lam_next - lam_k  # +inf on the last step: phi = 1, sig_next = 0
    phi = -jnp.expm1(-h)
    # 1 / (2 r_k) = h_k / (2 h_{k-1}); finite exactly where it is used.
    inv_2r = jnp.where(second, h, 1.0) / (2.0 * jnp.where(second, lam_k - lam_prev, 1.0))
    first = _per_slot(sig_next / sig_k, x) * x + _per_slot(a_next * phi, x) * m0
    extra = _per_slot(a_next * phi * inv_2r, x) * (m0 - m1)
    return first + _where(second, extra, 0.0)


def _unic(
    schedule: Schedule,
    taus: Array,
    step: Array,
    x: Array,
    m_k: Array,
    x_prev_c: Array,
    m_prev: Array,
    m_prev2: Array,
) -> Array:
    """UniC (bh2): the corrected x_k^c; x itself at k = 0. Order 1 at k = 1, 2 after."""
    a_k, sig_k, lam_k = _alpha_sigma_lambda(schedule, taus, step)
    _, sig_p, lam_p = _alpha_sigma_lambda(schedule, taus, step - 1)
    _, _, lam_p2 = _alpha_sigma_lambda(schedule, taus, step - 2)
    correct, second = step >= 1, step >= 2
    # h_{k-1} > 0 and finite for k >= 1 (tau_k >= 0); 1 stands in where unused.
    h = jnp.where(correct, lam_k - lam_p, 1.0)
    z = -h  # data prediction integrates in -h
    b_h = jnp.expm1(z)  # bh2: B(h) = e^{-h} - 1 (= z phi_1(z))
    hphi2 = b_h / z - 1.0  # z phi_2(z)
    hphi3 = hphi2 / z - 0.5  # z phi_3(z)
    b1, b2 = hphi2 / b_h, 2.0 * hphi3 / b_h
    r = jnp.where(second, (lam_p2 - lam_p) / h, -1.0)  # < 0: lambda_{k-2} < lambda_{k-1}
    rho1 = (b1 - b2) / (1.0 - r)
    rho2 = jnp.where(second, b1 - rho1, 0.5)  # first-order UniC: rho = 1/2
    coef = a_k * b_h
    base = _per_slot(sig_k / sig_p, x) * x_prev_c - _per_slot(coef, x) * m_prev
    corrected = base - _per_slot(coef * rho2, x) * (m_k - m_prev)
    older = _per_slot(coef * rho1 / r, x) * (m_prev2 - m_prev)
    corrected = corrected - _where(second, older, 0.0)
    return _where(correct, corrected, x)


def solver_step(
    solver: str,
    schedule: Schedule,
    taus: Array,
    x: Array,
    model_output: Array,
    step: Array,
    history: tuple[Array, ...],
    *,
    prediction: Prediction,
    eta: float | Array = 0.0,
    noise: Array | None = None,
    clip_x0: float | None = None,
) -> tuple[Array, Array, tuple[Array, ...]]:
    """One solver step for M slots, each at its own step index.

    taus (S+1,) int32: tau_0 > ... > tau_{S-1}, then -1 (clean), as `ddim._Denoiser.taus`.
    x (M, h, w, C): the latent the model was evaluated on at step k (for unipc: the
    uncorrected prediction). model_output (M, h, w, C): raw eps or v, already guided.
    step (M,) int32: each slot's k. history: `history_size(solver)` arrays (M, h, w, C),
    what this slot's frame returned at its step k-1; ignored where k = 0 (pass zeros).
    eta / noise: ddim only; ddim needs `noise` unless eta is a concrete 0. The multistep
    solvers are deterministic: an eta that is not a concrete 0 (a traced one included, as
    it cannot be checked) raises, and noise is ignored. clip_x0 clamps the x0 estimate
    (for multistep solvers: the data prediction they integrate, as diffusers' thresholding
    does).

    Returns (x at step k+1, x0 estimate at step k, history for step k+1), in x's dtype;
    arithmetic in float32. Traceable (jit/vmap/scan) with static solver and prediction.
    """
    _check_solver(solver)
    if len(history) != history_size(solver):
        raise ValueError(
            f"solver {solver!r} carries {history_size(solver)} history arrays, got {len(history)}"
        )
    step = jnp.asarray(step, jnp.int32)
    taus = jnp.asarray(taus, jnp.int32)
    t = taus[step]
    if solver == "ddim":
        if noise is None:
            if not _is_zero(eta):
                raise ValueError("ddim with eta != 0 (or a traced eta) needs `noise`")
            noise = jnp.zeros_like(x)
        x_next, x0 = ddim_step(
            schedule, x, t, taus[step + 1], model_output, prediction, eta, noise, clip_x0
        )
        return x_next, x0, ()
    if not _is_zero(eta):
        raise ValueError(f"solver {solver!r} is deterministic: eta must be 0 (got {eta!r})")
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    m_k, _ = to_x0_and_eps(prediction, schedule, xf, t, model_output.astype(jnp.float32))
    if clip_x0 is not None:
        m_k = jnp.clip(m_k, -clip_x0, clip_x0)
    hist = tuple(a.astype(jnp.float32) for a in history)
    if solver == "dpmpp_2m":
        (m_prev,) = hist
        x_next = _predict(schedule, taus, step, xf, m_k, m_prev)
        new = (m_k,)
    else:  # unipc
        x_prev_c, m_prev, m_prev2 = hist
        x_c = _unic(schedule, taus, step, xf, m_k, x_prev_c, m_prev, m_prev2)
        x_next = _predict(schedule, taus, step, x_c, m_k, m_prev)
        new = (x_c, m_k, m_prev)
    return x_next.astype(dtype), m_k.astype(dtype), tuple(a.astype(dtype) for a in new)
