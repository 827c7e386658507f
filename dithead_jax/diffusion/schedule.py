"""Gaussian diffusion: noise schedules and the forward-process math, as pure functions.

Discrete timesteps t in [0, T). `Schedule` is a pytree of float32 arrays indexed by t, so it
can be closed over or passed through `jax.jit`. Conventions follow ADM (Dhariwal & Nichol,
2021), whose hyperparameters DiT and DiT-Head use:

    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps              (q_sample)
    v   = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0               (Salimans & Ho, 2022)

Sampling (DDIM) lives in `ddim.py`; this module only knows the forward process, the
conversions between the prediction types and the training loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dithead_jax.config import DiffusionConfig

Array = jax.Array
Prediction = Literal["epsilon", "v"]

# ADM's cosine schedule (Nichol & Dhariwal, 2021): offset s and the beta clip near t = T.
_COSINE_OFFSET = 0.008
_MAX_BETA = 0.999


def make_betas(
    schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """(T,) float64 betas.

    "linear": ADM's. Endpoints are given for T = 1000 and scaled by 1000 / T so that other
        T describe the same continuous process (beta_start 1e-4, beta_end 0.02 at T=1000).
    "scaled_linear": LDM's, linear in sqrt(beta) between the endpoints as given (LDM itself
        uses beta_start 0.00085, beta_end 0.012 at T=1000; set them in DiffusionConfig).
    "cosine": abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at 0.999; ignores
        the endpoints.
    """
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        root = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps)
        return root.astype(np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = np.cos((steps + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], _MAX_BETA)
    raise ValueError(f"unknown beta schedule {schedule!r}")


@struct.dataclass
class Schedule:
    """Per-timestep constants of a discrete diffusion process, all (T,) float32."""

    betas: Array
    alphas_cumprod: Array  # abar_t
    alphas_cumprod_prev: Array  # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    # Posterior q(z_{t-1} | z_t, z_0) (for ancestral sampling and variance learning).
    posterior_variance: Array
    posterior_log_variance_clipped: Array
    posterior_mean_coef1: Array  # multiplies z_0
    posterior_mean_coef2: Array  # multiplies z_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> Schedule:
        # Derived in float64, stored in float32 (as ADM does).
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        # The variance is 0 at t = 0; its log borrows the t = 1 value, as in ADM.
        log_var = np.log(np.append(posterior_variance[1:2], posterior_variance[1:]))
        values = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=log_var,
            posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        )
        return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def make_schedule(config: DiffusionConfig) -> Schedule:
    """The `Schedule` a `DiffusionConfig` describes."""
    betas = make_betas(config.schedule, config.num_timesteps, config.beta_start, config.beta_end)
    return Schedule.from_betas(betas)


def _at(values: Array, t: Array, like: Array) -> Array:
    """values[t] for (B,) integer timesteps, shaped (B, 1, ..., 1) to broadcast over `like`."""
    picked = values[jnp.asarray(t, jnp.int32)]
    return picked.reshape(picked.shape + (1,) * (like.ndim - picked.ndim)).astype(like.dtype)


def sample_timesteps(rng: Array, batch_size: int, num_timesteps: int) -> Array:
    """(B,) int32 timesteps uniform over [0, T)."""
    return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """Draw z_t ~ q(z_t | z_0): x0, noise (B, ...), t (B,) -> (B, ...)."""
    return _at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + (
        _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def predict_x0_from_eps(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """z_0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _at(
        schedule.sqrt_alphas_cumprod, t, x_t
    )


def predict_eps_from_x0(schedule: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """eps = (z_t - sqrt(abar) z_0) / sqrt(1 - abar)."""
    return (x_t - _at(schedule.sqrt_alphas_cumprod, t, x_t) * x0) / _at(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_t
    )


def v_from_eps(schedule: Schedule, x0: Array, t: Array, eps: Array) -> Array:
    """The v target for a clean sample and the noise that was added to it."""
    return _at(schedule.sqrt_alphas_cumprod, t, x0) * eps - (
        _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def predict_x0_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """z_0 = sqrt(abar) z_t - sqrt(1 - abar) v."""
    return _at(schedule.sqrt_alphas_cumprod, t, x_t) * x_t - (
        _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def predict_eps_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """eps = sqrt(1 - abar) z_t + sqrt(abar) v."""
    return _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + (
        _at(schedule.sqrt_alphas_cumprod, t, x_t) * v
    )


def target_for(
    prediction: Prediction, schedule: Schedule, x0: Array, noise: Array, t: Array
) -> Array:
    """What the network is trained to output: the noise ("epsilon") or v."""
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return v_from_eps(schedule, x0, t, noise)
    raise ValueError(f"unknown prediction type {prediction!r}")


def to_x0_and_eps(
    prediction: Prediction, schedule: Schedule, x_t: Array, t: Array, model_output: Array
) -> tuple[Array, Array]:
    """Any prediction type -> (z_0, eps) estimates; what a sampler needs at every step."""
    if prediction == "epsilon":
        return predict_x0_from_eps(schedule, x_t, t, model_output), model_output
    if prediction == "v":
        return (
            predict_x0_from_v(schedule, x_t, t, model_output),
            predict_eps_from_v(schedule, x_t, t, model_output),
        )
    raise ValueError(f"unknown prediction type {prediction!r}")


def mean_flat(x: Array) -> Array:
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def diffusion_loss(pred: Array, target: Array) -> Array:
    """Scalar MSE between prediction and target, in float32 (Eq. 5-7 of the paper)."""
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(mean_flat(jnp.square(diff)))


def training_loss(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    prediction: Prediction = "epsilon",
    weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """One Monte-Carlo estimate of the denoising loss for a batch of clean latents.

    `model_fn(z_t, t)` closes over the conditioning (for DiT-Head: concat [z_t, z_m, z_r]
    on channels and the audio window). With learned sigma the model returns 2C channels;
    only the first C (the mean) enter this MSE. ADM's variational-bound term for the sigma
    half is not implemented, so learn_sigma models get no signal for that half here.
    `weights` (broadcastable to x0, e.g. (B, h, w, 1)) weigh the squared error per element.

    Returns (scalar loss, aux) with aux = {"t": (B,), "loss_per_example": (B,), "x_t":
    (B, ..., C) the noised input, "prediction": (B, ..., C) the model's eps or v for it}
    (what a loss on the one-step x0 estimate needs; unused entries cost nothing under jit).
    """
    t_rng, noise_rng = jax.random.split(rng)
    t = sample_timesteps(t_rng, x0.shape[0], schedule.num_timesteps)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    pred = model_fn(x_t, t)[..., : x0.shape[-1]]
    target = target_for(prediction, schedule, x0, noise, t)
    squared = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if weights is not None:
        squared = squared * weights
    per_example = mean_flat(squared)
    aux = {"t": t, "loss_per_example": per_example, "x_t": x_t, "prediction": pred}
    return jnp.mean(per_example), aux
