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

Long clips run in chunks of frames (`sample_video_chunk`): each chunk starts from the
references the previous chunk's last frame offered at every step, and keys its noise by the
global frame, so chunks equal one call. The update itself is a per-slot solver
(`solvers.py`: DDIM, DPM-Solver++(2M), UniPC), its history carried per frame.

Everything is traceable with static options; jit the caller (`diffusion/sampler.py`'s
`DiTSampler` does `nnx.split` once and a plain `jax.jit` on a mesh: `nnx.jit` would re-walk
the module graph in Python on every call).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dithead_jax.diffusion.schedule import Prediction, Schedule
from dithead_jax.diffusion.solvers import SOLVERS, history_size, solver_step
from dithead_jax.sharding import batch_shards_in_context, constrain

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


def _pad_rows(a: Array, rows: int) -> Array:
    """`a` (M, ...) padded to `rows` by repeating its last row (valid model inputs)."""
    extra = rows - a.shape[0]
    xp = np if isinstance(a, np.ndarray) else jnp  # static flags stay concrete
    return a if extra == 0 else xp.concatenate([a, xp.repeat(a[-1:], extra, axis=0)])


def _slot_rows(x: Array) -> Array:
    """Pin a (M, ...) slot batch to the mesh's batch axes (identity without a mesh)."""
    return constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1))


def _model_rows(model_fn: ModelFn, max_batch: int | None, *args: Array) -> Array:
    """model_fn over M rows, at most `max_batch` rows per call (a `lax.map` over chunks), the
    rows split over the mesh's batch axes.

    Rows are padded (repeats of the last) to a multiple of the batch shards and of the chunk,
    so every device holds the same share and every chunk has one shape; the padding is
    computed and dropped. Memory per call is then bounded by `max_batch` whatever the clip
    length: a wavefront of 250 slots holds ~16 GiB of f32 attention scores in one call.
    """
    m = args[0].shape[0]
    shards = batch_shards_in_context()
    chunk = m if max_batch is None else min(m, max_batch)
    chunk = -(-chunk // shards) * shards
    count = -(-m // chunk)
    padded = [_pad_rows(a, count * chunk) for a in args]

    def call(rows: list[Array]) -> Array:
        return _slot_rows(model_fn(*(_slot_rows(a) for a in rows)))

    if count == 1:
        return call(padded)[:m]
    # Chunk c takes rows c, c + count, c + 2 count, ...: each device's contiguous block of
    # rows then holds its share of every chunk, and no row moves between devices (taking
    # contiguous chunks would all-to-all every chunk's rows onto the mesh).
    stacked = [jnp.swapaxes(a.reshape((chunk, count) + a.shape[1:]), 0, 1) for a in padded]
    out = jax.lax.map(call, stacked)
    return jnp.swapaxes(out, 0, 1).reshape((count * chunk,) + out.shape[2:])[:m]


class _Denoiser:
    """One batched DiT call + solver update for M (video, frame, step) slots.

    Holds the static options so the three orders share the exact same arithmetic. Frame
    numbers are global (`frame_offset` added) so a clip sampled in chunks draws the same
    noise as in one piece.
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
        solver: str = "ddim",
        max_batch: int | None = None,
        frame_offset: int | Array = 0,
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
        self.solver = solver
        self.max_batch = max_batch
        self.frame_offset = frame_offset

    def model_output(self, x: Array, t: Array, audio: Array) -> Array:
        """The (guided) raw output for x (M, h, w, 3C): (M, h, w, C_out)."""
        w = self.guidance
        if isinstance(w, int | float) and w == 1:
            return _model_rows(self.model_fn, self.max_batch, x, t, audio)
        m = x.shape[0]
        # Rows M..2M-1: the same slots with the null audio.
        drop = np.arange(2 * m) >= m
        both = _model_rows(
            self.model_fn,
            self.max_batch,
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([audio, audio]),
            drop,
        )
        cond, uncond = both[:m], both[m:]
        return uncond + jnp.asarray(w, uncond.dtype) * (cond - uncond)

    def empty_history(self, like: Array) -> tuple[Array, ...]:
        """The solver's per-frame history buffers, shaped like `like` (zeros at step 0)."""
        return tuple(jnp.zeros_like(like) for _ in range(history_size(self.solver)))

    def __call__(
        self,
        x: Array,
        masked: Array,
        reference: Array,
        audio: Array,
        video: Array,
        frame: Array,
        step: Array,
        history: tuple[Array, ...],
    ) -> tuple[Array, Array, tuple[Array, ...]]:
        """x, masked, reference (M, h, w, C); audio (M, window, dim); video/frame/step (M,);
        history: the solver's buffers for these slots' frames (M, h, w, C) each.

        Returns (x at the next timestep, x0 estimate, history for the next step)."""
        t = self.taus[step]
        out = self.model_output(jnp.concatenate([x, masked, reference], axis=-1), t, audio)
        out = out[..., : x.shape[-1]].astype(x.dtype)  # learn_sigma: keep the mean half
        noise = None  # DDIM at eta = 0 skips the RNG work: sigma is 0 anyway
        if not (isinstance(self.eta, int | float) and self.eta == 0):
            frame = frame + self.frame_offset
            noise = _step_noise(self.step_key, video, frame, step, x.shape[1:])
        return solver_step(
            self.solver, self.schedule, self.taus, x, out, step, history,
            prediction=self.prediction, eta=self.eta, noise=noise, clip_x0=self.clip_x0,
        )  # fmt: skip


def _flat(x: Array) -> Array:
    """(B, F, ...) -> (B*F, ...)."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def num_model_calls(order: Order, num_frames: int, num_steps: int) -> int:
    """Sequential DiT calls an order makes for one clip (batch size aside)."""
    return {
        "nested": num_frames * num_steps,
        "wavefront": num_frames + num_steps - 1,
        "parallel": num_steps,
    }[order]


# ---------------------------------------------------------------------------------------
# The three orders. Each takes the denoiser, the initial noise x_init (B, N, h, w, C), the
# conditions, frame 0's reference at every step `refs0` (B, S, h, w, C) and the frame whose
# references a next chunk continues from (`carry`, traced); each returns the clean latents
# and that frame's references for its successor at every step (B, S, h, w, C).


def _nested(denoise, x_init, masked, audio, refs0, mode, carry):
    """Frame by frame, step by step: N*S calls of batch B. The reference order; any mode."""
    b, n = masked.shape[:2]
    s = refs0.shape[1]
    videos = jnp.arange(b)

    def frame_body(i, state):
        out, refs, kept = state
        masked_i, audio_i = jnp.take(masked, i, axis=1), jnp.take(audio, i, axis=1)
        frame = jnp.full((b,), i, jnp.int32)

        def step_body(k, c):
            x, history, trajectory = c
            step = jnp.full((b,), k, jnp.int32)
            x_next, x0, history = denoise(
                x, masked_i, refs[:, k], audio_i, videos, frame, step, history
            )
            # What frame i+1 will see at step k, for the same-step modes.
            seen = x if mode == "noisy_same_step" else x0
            return x_next, history, trajectory.at[:, k].set(seen)

        x0_i = jnp.take(x_init, i, axis=1)
        x_final, _, trajectory = jax.lax.fori_loop(
            0, s, step_body, (x0_i, denoise.empty_history(x0_i), jnp.zeros_like(refs))
        )
        if mode in ("noisy_same_step", "x0_same_step"):
            refs = trajectory
        elif mode == "final":
            refs = jnp.broadcast_to(x_final[:, None], refs.shape)
        kept = jnp.where(i == carry, refs, kept)
        return out.at[:, i].set(x_final), refs, kept

    out, _, kept = jax.lax.fori_loop(0, n, frame_body, (jnp.zeros_like(x_init), refs0, refs0))
    return out, kept


def _wavefront(denoise, x_init, masked, audio, refs0, mode, carry):
    """Anti-diagonals of the (frame, step) grid: N+S-1 calls of batch B*min(N, S).

    Diagonal d = 0 .. N+S-2 runs frame i at step k = d - i for every active frame
    max(0, d-S+1) <= i <= min(d, N-1). The call always covers the W = min(N, S) frames
    start .. start+W-1 with start = min(max(0, d-S+1), N-W) (fixed shape: compiles once);
    slots whose k falls outside [0, S) compute on stale inputs and are masked away. A frame
    reads its reference from a buffer its predecessor wrote on diagonal d-1 (its input x
    or its x0 at step k) and writes its own for its successor on diagonal d+1; frame 0
    reads refs0 at its step. The solver history is per frame and windowed like x.
    """
    b, n = masked.shape[:2]
    s = refs0.shape[1]
    w = min(n, s)
    # source[:, i+1] is what frame i wrote on the previous diagonal (its input x or its
    # x0); source[:, 0] is unused (frame 0 reads refs0).
    source = jnp.concatenate([refs0[:, :1], jnp.zeros_like(x_init)], axis=1)
    history = tuple(jnp.zeros_like(x_init) for _ in denoise.empty_history(x_init))
    videos = jnp.repeat(jnp.arange(b), w)  # flat slot (b, j) -> video b
    keep_shape = (1, w) + (1,) * (x_init.ndim - 2)

    def diagonal_body(d, state):
        x, source, history, kept = state
        # Frames lo..hi are active on this diagonal (hi - lo < W); slide the window so it
        # covers them and stays inside [0, N).
        start = jnp.minimum(jnp.maximum(0, d - s + 1), n - w)
        frames = start + jnp.arange(w)
        steps = d - frames
        valid = (steps >= 0) & (steps < s)  # (W,)
        steps = jnp.clip(steps, 0, s - 1)

        def window(a, offset=start):
            return jax.lax.dynamic_slice_in_dim(a, offset, w, axis=1)

        xs = window(x)  # (B, W, h, w, C)
        if mode == "fixed":
            refs = jnp.take(refs0, steps, axis=1)
        else:
            refs = window(source)  # frame i reads source[:, i], written by frame i-1
            first = jnp.take(refs0, steps[0], axis=1)  # frame 0's reference at its step
            refs = refs.at[:, 0].set(jnp.where(start == 0, first, refs[:, 0]))
        x_next, x0, new_history = denoise(
            _flat(xs), _flat(window(masked)), _flat(refs), _flat(window(audio)),
            videos, jnp.tile(frames, b), jnp.tile(steps, b),
            tuple(_flat(window(h)) for h in history),
        )  # fmt: skip
        keep = valid.reshape(keep_shape)

        def masked_update(buffer, new, offset=start):
            new = jnp.where(keep, new.reshape(xs.shape), window(buffer, offset))
            return jax.lax.dynamic_update_slice_in_dim(buffer, new, offset, axis=1)

        history = tuple(masked_update(h, new) for h, new in zip(history, new_history, strict=True))
        if mode != "fixed":
            seen = xs if mode == "noisy_same_step" else x0
            source = masked_update(source, seen, start + 1)
            # The carried frame's offer to its successor, at the step it took just now.
            k = d - carry
            offered = jnp.take(source, carry + 1, axis=1)[:, None]
            at_k = jax.lax.dynamic_update_slice_in_dim(kept, offered, jnp.clip(k, 0, s - 1), 1)
            kept = jnp.where((k >= 0) & (k < s), at_k, kept)
        return masked_update(x, x_next), source, history, kept

    init = (x_init, source, history, refs0)
    x, _, _, kept = jax.lax.fori_loop(0, n + s - 1, diagonal_body, init)
    return x, kept


def _parallel(denoise, x_init, masked, audio, refs0, mode, carry):
    """Every frame takes step k in the same call: S calls of batch B*N.

    Valid where frame i's reference at step k is known before any frame takes step k:
    "fixed" (z_r0) and "noisy_same_step" (x_{i-1}^k)."""
    b, n = masked.shape[:2]
    s = refs0.shape[1]
    videos = jnp.repeat(jnp.arange(b), n)
    frames = jnp.tile(jnp.arange(n), b)

    def step_body(k, state):
        x, history, kept = state
        first = jnp.take(refs0, k, axis=1)[:, None]
        if mode == "fixed":
            refs = jnp.broadcast_to(first, x.shape)
        else:
            refs = jnp.concatenate([first, x[:, :-1]], axis=1)
            kept = kept.at[:, k].set(jnp.take(x, carry, axis=1))
        step = jnp.full((b * n,), k, jnp.int32)
        x_next, _, history = denoise(
            _flat(x), _flat(masked), _flat(refs), _flat(audio), videos, frames, step, history
        )
        return x_next.reshape(x.shape), history, kept

    history = denoise.empty_history(_flat(x_init))
    x, _, kept = jax.lax.fori_loop(0, s, step_body, (x_init, history, refs0))
    return x, kept


_ORDERS = {"nested": _nested, "wavefront": _wavefront, "parallel": _parallel}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown reference mode {mode!r}; choose from {MODES}")


def resolve_order(mode: Mode, order: Order = "auto") -> str:
    """The order `sample_video` uses: `auto` = fewest sequential calls the mode allows."""
    _check_mode(mode)
    if order == "auto":
        return _AUTO_ORDER[mode]
    if order not in _ALLOWED_ORDERS[mode]:
        raise ValueError(f"mode {mode!r} cannot run in order {order!r}")
    return order


def sample_video_chunk(
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
    solver: str = "ddim",
    max_batch: int | None = None,
    frame_offset: int | Array = 0,
    carry_frame: int | Array | None = None,
) -> tuple[Array, Array]:
    """`sample_video` on frames frame_offset .. frame_offset+N-1 of a longer clip.

    first_reference: (B, h, w, C) z_r0, or (B, S, h, w, C) frame 0's reference at every
    step (what the previous chunk's `references` output offers it). Returns (latents
    (B, N, h, w, C), references (B, S, h, w, C)): the references frame `carry_frame`
    (default N-1; traced, so padded chunks compile once) offers its successor, to pass as
    the next chunk's `first_reference` with frame_offset advanced by carry_frame + 1. The
    chunks then equal one whole-clip call (to float reassociation). In "fixed" mode the
    references stay z_r0 throughout.
    """
    _check_mode(mode)
    run = _ORDERS[resolve_order(mode, order)]
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    impl = str(jax.random.key_impl(rng))
    if impl != "threefry2x32":
        warnings.warn(
            f"{impl} keys are not vmap-invariant: the sampling orders will draw different "
            "noise (use jax.random.key's default threefry for order-independent results)",
            stacklevel=3,
        )
    init_key, step_key = jax.random.split(rng)
    denoise = _Denoiser(
        model_fn,
        schedule,
        ddim_timesteps(schedule.num_timesteps, num_steps, spacing),
        eta=eta,
        prediction=prediction,
        clip_x0=clip_x0,
        step_key=step_key,
        guidance=guidance,
        solver=solver,
        max_batch=max_batch,
        frame_offset=frame_offset,
    )
    b, n = masked.shape[:2]
    frames = frame_offset + jnp.arange(n)
    x_init = _initial_noise(init_key, b, frames, masked.shape[2:]).astype(masked.dtype)
    refs0 = first_reference.astype(masked.dtype)
    if refs0.ndim == masked.ndim - 1:
        refs0 = jnp.broadcast_to(refs0[:, None], (b, num_steps) + refs0.shape[1:])
    if refs0.shape != (b, num_steps) + masked.shape[2:]:
        raise ValueError(
            f"first_reference {first_reference.shape} is neither (B, h, w, C) nor "
            f"(B, {num_steps} steps, h, w, C) for latents {masked.shape}"
        )
    carry = jnp.asarray(n - 1 if carry_frame is None else carry_frame, jnp.int32)
    return run(denoise, x_init, masked, audio, refs0, mode, carry)


def sample_video(
    model_fn: ModelFn,
    schedule: Schedule,
    masked: Array,
    audio: Array,
    first_reference: Array,
    rng: Array,
    **options: Any,
) -> Array:
    """Sample B videos of N frames with a progressive reference (see module docstring).

    masked (B, N, h, w, C)        z_m: latents of the masked frames
    audio (B, N, window, dim)     each frame's audio window
    first_reference (B, h, w, C)  z_r0 = E(a random frame of the target video)
    rng                           a key; randomness depends on (rng, video, frame, step)
    -> (B, N, h, w, C)            clean latents, for the decoder D

    Options (static unless said): num_steps (250, the paper's), eta (0; may be a traced
    scalar: one compile for every eta, the noise then always drawn), mode, prediction,
    spacing, clip_x0, order (`auto`: parallel for fixed / noisy_same_step, wavefront for
    x0_same_step, nested for final), guidance w (classifier-free guidance on audio, 1 = off;
    needs a model_fn taking `drop_audio`; each call then runs 2x the rows), solver ("ddim",
    "dpmpp_2m", "unipc": `solvers.py`), max_batch (rows per DiT call, None = all). Traceable:
    call it inside `jax.jit` (see `diffusion/sampler.py`).
    """
    return sample_video_chunk(model_fn, schedule, masked, audio, first_reference, rng, **options)[0]


def dit_calls_per_clip(order: Order, num_frames: int, num_steps: int) -> dict[str, int]:
    """Sequential calls and the per-call batch (slots per video) an order uses."""
    per_call = {"nested": 1, "wavefront": min(num_frames, num_steps), "parallel": num_frames}
    return {
        "calls": num_model_calls(order, num_frames, num_steps),
        "slots_per_call": per_call[order],
        "evaluations": num_model_calls(order, num_frames, num_steps) * per_call[order],
        "useful_evaluations": num_frames * num_steps,
    }
