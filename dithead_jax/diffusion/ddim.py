"""DDIM sampling (Song et al., 2021) of DiT-Head videos with a progressive reference.

Notation. Frames i = 0..N-1 of each of B videos; DDIM steps k = 0..S-1 over the timesteps
tau_0 > tau_1 > ... > tau_{S-1} (`ddim_timesteps`), with tau_S = -1 meaning "clean"
(abar = 1). x_i^k is frame i's latent entering step k: x_i^0 is Gaussian noise, x_i^S the
sample. Step k calls the DiT once for frame i,

    out_i^k = model_fn(concat[x_i^k, z_m_i, r_i^k], tau_k, audio_i)

turns it into (x0_i^k, eps_i^k) and moves x_i^k to x_i^{k+1} (`ddim_step`).

Reference r_i^k (the DiT's third input). Frame 0 always gets z_r0, the latent of a random
frame of the target video (the paper's "random reference image"). For i > 0:

    fixed            r_i^k = z_r0                 every frame sees the random frame
    noisy_same_step  r_i^k = x_{i-1}^k            frame i-1's noisy latent entering step k
                                                  (the paper's wording, Sec. 3.4)
    x0_same_step     r_i^k = x0_{i-1}^k           frame i-1's clean estimate at step k (in
                                                  training the DiT only saw clean refs)
    final            r_i^k = x_{i-1}^S            frame i-1's finished latent (DiffTalk)

Orders of evaluation. All give the same numbers (up to float reassociation in batched
matmuls, ~1e-6); they differ in how many DiT calls run one after another:

    nested     for i: for k: one call of batch B                  N*S calls, any mode
    wavefront  for d in 0..N+S-2: all (i, k) with i + k = d       N+S-1 calls, batch
               in one call of batch B*min(N, S)                   B*min(N, S); not "final"
    parallel   for k: all frames in one call of batch B*N         S calls; "fixed" and
                                                                  "noisy_same_step" only

Why the wavefront is exact for x0_same_step: (i, k) needs x0_{i-1}^k, produced by the call
for (i-1, k) on diagonal d-1, and x_i^k, produced by (i, k-1) on diagonal d-1. Every
diagonal therefore only reads what earlier diagonals wrote. noisy_same_step is looser:
x_{i-1}^k exists as soon as every frame has finished step k-1, so all frames can take step
k together ("parallel", S calls); the wavefront is exact for it too (it reads the value
frame i-1 entered its previous-diagonal step with). "final" is strictly sequential.

Classifier-free guidance on audio (`guidance` w, 1 = off): every DiT call becomes one call
on 2M rows, the M slots with their audio and the same M with the learned null audio
(`drop_audio`), combined as out = uncond + w (cond - uncond) on the raw output (eps or v)
before the DDIM update. It lives in the one denoiser all orders share, so every mode and
order gets it; at w = 1 the call is the plain unguided one (not a 2M-row call).

Randomness is a function of (rng, video b, frame i, step k) only: the initial noise from
fold_in(init_key, b, i), the eta > 0 noise of step k from fold_in(step_key, b, i, k). So the
orders agree exactly, and frame i does not depend on N or on B. This needs a vmap-invariant
key: threefry (`jax.random.key`'s default). "rbg" keys draw different bits under vmap of a
different size, so with them the orders disagree; `sample_video` warns.

Everything is traceable with static options; jit the caller (see `make_dit_sampler`, which
does `nnx.split` once and a plain `jax.jit`: `nnx.jit` would re-walk the module graph in
Python on every call).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax.diffusion.schedule import Prediction, Schedule, to_x0_and_eps

Array = jax.Array
Mode = Literal["fixed", "noisy_same_step", "x0_same_step", "final"]
Spacing = Literal["uniform", "trailing", "leading"]
Order = Literal["auto", "nested", "wavefront", "parallel"]
# model_fn(x (M, h, w, 3C), t (M,) int32, audio (M, window, dim)[, drop_audio (M,) bool])
# -> (M, h, w, C or 2C). The fourth argument is passed only with guidance != 1.
ModelFn = Callable[..., Array]

MODES: tuple[str, ...] = ("fixed", "noisy_same_step", "x0_same_step", "final")
# The orders each mode allows (nested always works).
_ALLOWED_ORDERS = {
    "fixed": ("nested", "wavefront", "parallel"),
    "noisy_same_step": ("nested", "wavefront", "parallel"),
    "x0_same_step": ("nested", "wavefront"),
    "final": ("nested",),
}
# Fewest sequential DiT calls first.
_AUTO_ORDER = {
    "fixed": "parallel",
    "noisy_same_step": "parallel",
    "x0_same_step": "wavefront",
    "final": "nested",
}


# ---------------------------------------------------------------------------------------
# Timesteps and the single DDIM update


def ddim_timesteps(
    num_train_steps: int, num_steps: int, spacing: Spacing = "uniform"
) -> np.ndarray:
    """(num_steps,) int32 training timesteps in sampling order (strictly decreasing).

    "uniform":  round(linspace(0, T-1, S)): both ends of the chain, evenly spaced.
    "leading":  k * (T // S) for k < S: the DDIM paper's / ADM's `ddimS` / LDM's "uniform"
                (without LDM's +1); 0 included, the top T - T//S .. T-1 never visited.
    "trailing": round(T - k*T/S) - 1: starts at T-1, the noisiest step (Lin et al., 2024,
                "Common diffusion noise schedules and sample steps are flawed").
    """
    t, s = num_train_steps, num_steps
    if not 1 <= s <= t:
        raise ValueError(f"num_steps must be in [1, {t}], got {s}")
    k = np.arange(s, dtype=np.float64)
    if spacing == "uniform":
        # floor(x + 0.5), not np.round: round-half-to-even could merge neighbours.
        steps = np.floor(np.linspace(0, t - 1, s) + 0.5)
    elif spacing == "leading":
        steps = k * (t // s)
    elif spacing == "trailing":
        steps = np.floor(t - k * t / s + 0.5) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    steps = np.sort(steps.astype(np.int32))[::-1].copy()
    assert (np.diff(steps) < 0).all() and steps[-1] >= 0 and steps[0] < t
    return steps


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


# ---------------------------------------------------------------------------------------
# Shared pieces of the three orders


def _initial_noise(key: Array, batch: int, frames: Array, shape: tuple[int, ...]) -> Array:
    """x_i^0 for every video b and frame i in `frames` (F,): (B, F, *shape)."""

    def one(b: Array, i: Array) -> Array:
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, b), i), shape)

    per_video = jax.vmap(lambda b: jax.vmap(lambda i: one(b, i))(frames))
    return per_video(jnp.arange(batch))


def _step_noise(key: Array, video: Array, frame: Array, step: Array, shape: tuple) -> Array:
    """The eta-noise of (video, frame, step), each (M,) int: (M, *shape)."""

    def one(b: Array, i: Array, k: Array) -> Array:
        slot_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, b), i), k)
        return jax.random.normal(slot_key, shape)

    return jax.vmap(one)(video, frame, step)


class _Denoiser:
    """One batched DiT call + DDIM update for M (video, frame, step) slots.

    Holds the static options so the three orders share the exact same arithmetic.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: Schedule,
        timesteps: np.ndarray,
        *,
        eta: float | Array,
        prediction: Prediction,
        clip_x0: float | None,
        step_key: Array,
        guidance: float | Array = 1.0,
    ):
        self.model_fn = model_fn
        self.schedule = schedule
        # tau_0 .. tau_{S-1}, then -1 (clean) as the target of the last step.
        self.taus = jnp.asarray(np.append(timesteps, -1), jnp.int32)
        self.eta = eta
        self.prediction = prediction
        self.clip_x0 = clip_x0
        self.step_key = step_key
        self.guidance = guidance

    def model_output(self, x: Array, t: Array, audio: Array) -> Array:
        """The (guided) raw output for x (M, h, w, 3C): (M, h, w, C_out)."""
        w = self.guidance
        if isinstance(w, int | float) and w == 1:
            return self.model_fn(x, t, audio)
        m = x.shape[0]
        drop = np.arange(2 * m) >= m  # rows M..2M-1: the same slots with the null audio
        both = self.model_fn(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([audio, audio]), drop
        )
        cond, uncond = both[:m], both[m:]
        return uncond + jnp.asarray(w, uncond.dtype) * (cond - uncond)

    def __call__(
        self,
        x: Array,
        masked: Array,
        reference: Array,
        audio: Array,
        video: Array,
        frame: Array,
        step: Array,
    ) -> tuple[Array, Array]:
        """x, masked, reference (M, h, w, C); audio (M, window, dim); video/frame/step (M,).

        Returns (x at the next timestep, x0 estimate), both (M, h, w, C).
        """
        t, t_prev = self.taus[step], self.taus[step + 1]
        out = self.model_output(jnp.concatenate([x, masked, reference], axis=-1), t, audio)
        out = out[..., : x.shape[-1]].astype(x.dtype)  # learn_sigma: keep the mean half
        if isinstance(self.eta, int | float) and self.eta == 0:
            noise = jnp.zeros_like(x)  # skip the RNG work: sigma is 0 anyway
        else:
            noise = _step_noise(self.step_key, video, frame, step, x.shape[1:])
        return ddim_step(
            self.schedule, x, t, t_prev, out, self.prediction, self.eta, noise, self.clip_x0
        )


def _flat(x: Array) -> Array:
    """(B, F, ...) -> (B*F, ...)."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _setup(
    model_fn: ModelFn,
    schedule: Schedule,
    masked: Array,
    rng: Array,
    num_steps: int,
    eta: float | Array,
    prediction: Prediction,
    spacing: Spacing,
    clip_x0: float | None,
    guidance: float | Array = 1.0,
) -> tuple[_Denoiser, Array]:
    """The shared denoiser and the initial noise (B, N, h, w, C)."""
    impl = str(jax.random.key_impl(rng))
    if impl != "threefry2x32":
        warnings.warn(
            f"{impl} keys are not vmap-invariant: the sampling orders will draw different "
            "noise (use jax.random.key's default threefry for order-independent results)",
            stacklevel=3,
        )
    init_key, step_key = jax.random.split(rng)
    timesteps = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
    denoise = _Denoiser(
        model_fn,
        schedule,
        timesteps,
        eta=eta,
        prediction=prediction,
        clip_x0=clip_x0,
        step_key=step_key,
        guidance=guidance,
    )
    b, n = masked.shape[:2]
    x_init = _initial_noise(init_key, b, jnp.arange(n), masked.shape[2:]).astype(masked.dtype)
    return denoise, x_init


def num_model_calls(order: Order, num_frames: int, num_steps: int) -> int:
    """Sequential DiT calls an order makes for one clip (batch size aside)."""
    return {
        "nested": num_frames * num_steps,
        "wavefront": num_frames + num_steps - 1,
        "parallel": num_steps,
    }[order]


# ---------------------------------------------------------------------------------------
# The three orders


def sample_video_nested(
    model_fn: ModelFn,
    schedule: Schedule,
    masked: Array,
    audio: Array,
    first_reference: Array,
    rng: Array,
    *,
    num_steps: int,
    eta: float | Array = 0.0,
    mode: Mode = "x0_same_step",
    prediction: Prediction = "epsilon",
    spacing: Spacing = "uniform",
    clip_x0: float | None = None,
    guidance: float | Array = 1.0,
) -> Array:
    """Frame by frame, step by step: N*S calls of batch B. The reference order; any mode.

    masked (B, N, h, w, C), audio (B, N, window, dim), first_reference (B, h, w, C)
    -> (B, N, h, w, C) clean latents.
    """
    _check_mode(mode)
    denoise, x_init = _setup(
        model_fn, schedule, masked, rng, num_steps, eta, prediction, spacing, clip_x0, guidance
    )
    b, n = masked.shape[:2]
    videos = jnp.arange(b)
    z_r0 = first_reference.astype(masked.dtype)
    # refs[k] = the reference the current frame uses at step k; (S, B, h, w, C).
    refs0 = jnp.broadcast_to(z_r0, (num_steps,) + z_r0.shape)

    def frame_body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        out, refs = carry
        masked_i = jnp.take(masked, i, axis=1)
        audio_i = jnp.take(audio, i, axis=1)
        frame = jnp.full((b,), i, jnp.int32)

        def step_body(k: Array, c: tuple[Array, Array]) -> tuple[Array, Array]:
            x, trajectory = c
            step = jnp.full((b,), k, jnp.int32)
            x_next, x0 = denoise(x, masked_i, refs[k], audio_i, videos, frame, step)
            # What frame i+1 will see at step k, for the same-step modes.
            seen = x if mode == "noisy_same_step" else x0
            return x_next, trajectory.at[k].set(seen)

        x_final, trajectory = jax.lax.fori_loop(
            0, num_steps, step_body, (jnp.take(x_init, i, axis=1), jnp.zeros_like(refs))
        )
        if mode in ("noisy_same_step", "x0_same_step"):
            refs = trajectory
        elif mode == "final":
            refs = jnp.broadcast_to(x_final, refs.shape)
        return out.at[:, i].set(x_final), refs

    out, _ = jax.lax.fori_loop(0, n, frame_body, (jnp.zeros_like(masked), refs0))
    return out


def sample_video_wavefront(
    model_fn: ModelFn,
    schedule: Schedule,
    masked: Array,
    audio: Array,
    first_reference: Array,
    rng: Array,
    *,
    num_steps: int,
    eta: float | Array = 0.0,
    mode: Mode = "x0_same_step",
    prediction: Prediction = "epsilon",
    spacing: Spacing = "uniform",
    clip_x0: float | None = None,
    guidance: float | Array = 1.0,
) -> Array:
    """Anti-diagonals of the (frame, step) grid: N+S-1 calls of batch B*min(N, S).

    Diagonal d = 0 .. N+S-2 runs frame i at step k = d - i for every active frame
    max(0, d-S+1) <= i <= min(d, N-1). The call always covers the W = min(N, S) frames
    start .. start+W-1 with start = min(max(0, d-S+1), N-W) (fixed shape: compiles once);
    slots whose k falls outside [0, S) compute on stale inputs and are masked away. A frame
    reads its reference from a buffer its predecessor wrote on diagonal d-1 (its input x
    or its x0 at step k) and writes its own for its successor on diagonal d+1. Shapes as
    `sample_video_nested`.
    """
    _check_mode(mode)
    if mode == "final":
        raise ValueError("mode 'final' is strictly sequential; use sample_video_nested")
    denoise, x_init = _setup(
        model_fn, schedule, masked, rng, num_steps, eta, prediction, spacing, clip_x0, guidance
    )
    b, n = masked.shape[:2]
    s = num_steps
    w = min(n, s)
    z_r0 = first_reference.astype(masked.dtype)
    # source[:, i] is the reference of frame i at the step it takes next: slot 0 is z_r0;
    # slot i+1 is what frame i wrote on the previous diagonal (its input x or its x0).
    source = jnp.concatenate(
        [z_r0[:, None], jnp.broadcast_to(z_r0[:, None], (b, n) + z_r0.shape[1:])], axis=1
    )
    videos = jnp.repeat(jnp.arange(b), w)  # flat slot (b, j) -> video b

    def diagonal_body(d: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        x, source = carry
        # Frames lo..hi are active on this diagonal (hi - lo < W); slide the window so it
        # covers them and stays inside [0, N).
        lo = jnp.maximum(0, d - s + 1)
        start = jnp.minimum(lo, n - w)
        frames = start + jnp.arange(w)
        steps = d - frames
        valid = (steps >= 0) & (steps < s)  # (W,)
        steps = jnp.clip(steps, 0, s - 1)

        def window(a: Array, offset: Array = start) -> Array:
            return jax.lax.dynamic_slice_in_dim(a, offset, w, axis=1)

        xs = window(x)  # (B, W, h, w, C)
        x_next, x0 = denoise(
            _flat(xs),
            _flat(window(masked)),
            _flat(window(source)),  # frame i reads source[:, i], written by frame i-1
            _flat(window(audio)),
            videos,
            jnp.tile(frames, b),
            jnp.tile(steps, b),
        )
        keep = valid.reshape((1, w) + (1,) * (xs.ndim - 2))
        x_next = jnp.where(keep, x_next.reshape(xs.shape), xs)
        seen = xs if mode == "noisy_same_step" else x0.reshape(xs.shape)
        if mode != "fixed":
            seen = jnp.where(keep, seen, window(source, start + 1))
            source = jax.lax.dynamic_update_slice_in_dim(source, seen, start + 1, axis=1)
        x = jax.lax.dynamic_update_slice_in_dim(x, x_next, start, axis=1)
        return x, source

    x, _ = jax.lax.fori_loop(0, n + s - 1, diagonal_body, (x_init, source))
    return x


def sample_video_parallel(
    model_fn: ModelFn,
    schedule: Schedule,
    masked: Array,
    audio: Array,
    first_reference: Array,
    rng: Array,
    *,
    num_steps: int,
    eta: float | Array = 0.0,
    mode: Mode = "fixed",
    prediction: Prediction = "epsilon",
    spacing: Spacing = "uniform",
    clip_x0: float | None = None,
    guidance: float | Array = 1.0,
) -> Array:
    """Every frame takes step k in the same call: S calls of batch B*N.

    Valid where frame i's reference at step k is known before any frame takes step k:
    "fixed" (z_r0) and "noisy_same_step" (x_{i-1}^k). Shapes as `sample_video_nested`.
    """
    _check_mode(mode)
    if mode not in ("fixed", "noisy_same_step"):
        raise ValueError(f"mode {mode!r} needs frame i-1's step-k output: use the wavefront")
    denoise, x_init = _setup(
        model_fn, schedule, masked, rng, num_steps, eta, prediction, spacing, clip_x0, guidance
    )
    b, n = masked.shape[:2]
    z_r0 = first_reference.astype(masked.dtype)[:, None]
    videos = jnp.repeat(jnp.arange(b), n)
    frames = jnp.tile(jnp.arange(n), b)

    def step_body(k: Array, x: Array) -> Array:
        if mode == "fixed":
            refs = jnp.broadcast_to(z_r0, x.shape)
        else:
            refs = jnp.concatenate([z_r0, x[:, :-1]], axis=1)
        step = jnp.full((b * n,), k, jnp.int32)
        x_next, _ = denoise(
            _flat(x), _flat(masked), _flat(refs), _flat(audio), videos, frames, step
        )
        return x_next.reshape(x.shape)

    return jax.lax.fori_loop(0, num_steps, step_body, x_init)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown reference mode {mode!r}; choose from {MODES}")


_SAMPLERS = {
    "nested": sample_video_nested,
    "wavefront": sample_video_wavefront,
    "parallel": sample_video_parallel,
}


def resolve_order(mode: Mode, order: Order = "auto") -> str:
    """The order `sample_video` uses: `auto` = fewest sequential calls the mode allows."""
    _check_mode(mode)
    if order == "auto":
        return _AUTO_ORDER[mode]
    if order not in _ALLOWED_ORDERS[mode]:
        raise ValueError(f"mode {mode!r} cannot run in order {order!r}")
    return order


def sample_video(
    model_fn: ModelFn,
    schedule: Schedule,
    masked: Array,
    audio: Array,
    first_reference: Array,
    rng: Array,
    *,
    num_steps: int = 250,
    eta: float | Array = 0.0,
    mode: Mode = "x0_same_step",
    prediction: Prediction = "epsilon",
    spacing: Spacing = "uniform",
    clip_x0: float | None = None,
    order: Order = "auto",
    guidance: float | Array = 1.0,
) -> Array:
    """DDIM-sample B videos of N frames with a progressive reference (see module docstring).

    masked (B, N, h, w, C)        z_m: latents of the masked frames
    audio (B, N, window, dim)     each frame's audio window
    first_reference (B, h, w, C)  z_r0 = E(a random frame of the target video)
    rng                           a key; randomness depends on (rng, video, frame, step)
    -> (B, N, h, w, C)            clean latents, for the decoder D

    Defaults follow the paper (250 steps, eta = 0). `eta` may be a traced scalar (one
    compile for every eta; the noise is then always drawn). `order` picks the schedule
    (`auto`: parallel for fixed / noisy_same_step, wavefront for x0_same_step, nested for
    final). `guidance` w: classifier-free guidance on audio (1 = off; needs a model_fn
    taking `drop_audio`, i.e. a DiT with null audio; each call then runs 2x the rows).
    Traceable: call it inside `jax.jit` (see `make_dit_sampler`).
    """
    sampler = _SAMPLERS[resolve_order(mode, order)]
    return sampler(
        model_fn,
        schedule,
        masked,
        audio,
        first_reference,
        rng,
        num_steps=num_steps,
        eta=eta,
        mode=mode,
        prediction=prediction,
        spacing=spacing,
        clip_x0=clip_x0,
        guidance=guidance,
    )


def make_dit_sampler(
    model: nnx.Module, schedule: Schedule, **options: Any
) -> Callable[[Array, Array, Array, Array], Array]:
    """A jitted `(masked, audio, first_reference, rng) -> latents` for an NNX denoiser.

    `nnx.split` happens once here; the parameters enter the jitted function as an argument
    (not baked-in constants), and the merge happens inside the trace, so a call costs one
    dispatch however many steps the sampler loops over. `options` are `sample_video`'s
    keyword arguments (static).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, schedule, masked, audio, first_reference, rng):
        denoiser = nnx.merge(graphdef, state)
        return sample_video(denoiser, schedule, masked, audio, first_reference, rng, **options)

    def sampler(masked: Array, audio: Array, first_reference: Array, rng: Array) -> Array:
        return run(state, schedule, masked, audio, first_reference, rng)

    return sampler


def dit_calls_per_clip(order: Order, num_frames: int, num_steps: int) -> dict[str, int]:
    """Sequential calls and the per-call batch (slots per video) an order uses."""
    per_call = {"nested": 1, "wavefront": min(num_frames, num_steps), "parallel": num_frames}
    return {
        "calls": num_model_calls(order, num_frames, num_steps),
        "slots_per_call": per_call[order],
        "evaluations": num_model_calls(order, num_frames, num_steps) * per_call[order],
        "useful_evaluations": num_frames * num_steps,
    }
