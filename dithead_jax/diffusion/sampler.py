"""The compiled DiT video sampler: one jitted program per (options, clip bucket), sharded
over a device mesh, memory bounded per call, continued across chunks of a long clip.

    sampler = DiTSampler(dit, schedule, SamplerOptions(num_steps=50, max_batch=64))
    latents, refs = sampler(masked, audio, z_r0, key)                   # frames 0..N-1
    more, refs = sampler(masked2, audio2, refs, key, frame_offset=N)   # frames N..

`ddim.sample_video_chunk` is the math; this module owns how it runs:

  * Mesh. The (frame x step) slots of one DiT call — the wavefront's B*min(N, S), the
    parallel order's B*N — are split over the mesh's batch axes (`DIT_RULES`'
    activation_batch: data x fsdp), so one clip uses every device; the weights follow the
    same rules as in training (replicated under `dp`, ZeRO-3 split under `fsdp`). Default:
    `dp` over this process's devices (an evaluation over several processes gives each its
    own clips).
  * Memory. `max_batch` caps the rows of one DiT call (a `lax.map` over chunks inside the
    step), so a 250-step wavefront does not hold 250 slots' attention scores at once.
  * Compiles. A clip of N frames runs padded to a bucket (a power of two, at least
    `min_bucket`): frames are causal (frame i reads only frames < i), so padding frames at
    the end change nothing before them and are dropped. The carried references come from
    the last real frame (a traced index), so every length in a bucket shares one program;
    `traces` counts them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax import sharding
from dithead_jax.diffusion.ddim import sample_video_chunk
from dithead_jax.diffusion.schedule import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """What `ddim.sample_video_chunk` is run with (see there), plus how it is run."""

    num_steps: int = 50
    mode: str = "x0_same_step"
    order: str = "auto"
    solver: str = "ddim"
    spacing: str = "uniform"
    eta: float = 0.0
    guidance: float = 1.0
    prediction: str = "epsilon"
    clip_x0: float | None = None
    max_batch: int | None = None  # DiT rows per call (None: all slots of a call at once)
    min_bucket: int = 8  # the smallest padded clip length

    def sample_kwargs(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields.pop("min_bucket")
        return fields


def bucket(num_frames: int, min_bucket: int = 8) -> int:
    """The padded clip length: the next power of two >= num_frames, at least min_bucket."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame (got {num_frames})")
    return max(min_bucket, 1 << (num_frames - 1).bit_length())


def _pad_frames(a: Array, frames: int) -> Array:
    """(B, N, ...) -> (B, frames, ...) by repeating the last frame."""
    extra = frames - a.shape[1]
    return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[:, -1:], extra, axis=1)], 1)


class DiTSampler:
    """`(masked, audio, first_reference, rng, frame_offset) -> (latents, references)` for an
    NNX denoiser, jitted once per bucket on `mesh` (see the module docstring).

    `nnx.split` happens once here; the weights enter the program as an argument placed by
    the rules (not baked-in constants) and merge inside the trace, so a call is one
    dispatch however many steps it loops over."""

    def __init__(
        self,
        model: nnx.Module,
        schedule: Schedule,
        options: SamplerOptions = SamplerOptions(),
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules = sharding.DIT_RULES,
    ):
        self.options = options
        self.schedule = schedule
        self.mesh = mesh if mesh is not None else sharding.make_mesh("dp", jax.local_devices())
        self.rules = rules
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, sharding.tree_shardings(state, rules, self.mesh))
        self.traces = 0  # programs traced (= compiled): one per bucket and input dtype
        kwargs = options.sample_kwargs()
        replicated = self._replicated = sharding.replicated(self.mesh)

        def run(state, schedule, masked, audio, first, rng, frame_offset, carry_frame):
            self.traces += 1
            denoiser = nnx.merge(graphdef, state)
            return sample_video_chunk(
                denoiser, schedule, masked, audio, first, rng,
                frame_offset=frame_offset, carry_frame=carry_frame, **kwargs,
            )  # fmt: skip

        self._run = jax.jit(run, out_shardings=(replicated, replicated))

    def _args(self, masked, audio, first_reference, rng, frame_offset) -> tuple:
        padded = bucket(masked.shape[1], self.options.min_bucket)
        first = jnp.asarray(first_reference)
        if first.ndim == 4:  # z_r0 at every step: the continuation's shape, one program
            first = jnp.broadcast_to(first[:, None], (first.shape[0], self.options.num_steps)
                                     + first.shape[1:])  # fmt: skip
        inputs = (
            _pad_frames(jnp.asarray(masked), padded),
            _pad_frames(jnp.asarray(audio), padded),
            first,
            rng,
            jnp.int32(frame_offset),
            jnp.int32(masked.shape[1] - 1),
        )
        # One placement for every input, fresh or returned by the previous chunk: jit keys
        # its cache on input shardings too.
        return (self.state, self.schedule, *jax.device_put(inputs, self._replicated))

    def __call__(
        self,
        masked: Array,
        audio: Array,
        first_reference: Array,
        rng: Array,
        frame_offset: int = 0,
    ) -> tuple[Array, Array]:
        """masked (B, N, h, w, C), audio (B, N, window, dim), first_reference (B, h, w, C)
        or (B, S, h, w, C) -> (latents (B, N, h, w, C), references (B, S, h, w, C))."""
        args = self._args(masked, audio, first_reference, rng, frame_offset)
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            latents, refs = self._run(*args)
        return latents[:, : masked.shape[1]], refs

    def lower(self, masked: Any, audio: Any, first_reference: Any) -> Any:
        """The `jax.stages.Lowered` program a call with arrays of these shapes (arrays or
        ShapeDtypeStructs; first_reference (B, h, w, C)) runs, for reading its HLO, cost and
        memory without running anything (tests, bench/sample.py)."""
        b, n = masked.shape[:2]
        frames = (b, bucket(n, self.options.min_bucket))

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated)

        first = (b, self.options.num_steps) + tuple(first_reference.shape[1:])
        args = (
            spec(frames + tuple(masked.shape[2:]), masked.dtype),
            spec(frames + tuple(audio.shape[2:]), audio.dtype),
            spec(first, first_reference.dtype),
            jax.device_put(jax.random.key(0), self._replicated),
            spec((), jnp.int32),
            spec((), jnp.int32),
        )
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self._run.lower(self.state, self.schedule, *args)


def sample_in_chunks(
    sampler: DiTSampler,
    masked: np.ndarray,
    audio: np.ndarray,
    first_reference: np.ndarray,
    rng: Array,
    chunk_frames: int,
) -> np.ndarray:
    """A whole clip (B, N, ...) sampled `chunk_frames` at a time, each chunk continuing
    from the last (equal to one call to float reassociation); returns host latents."""
    refs, out = jnp.asarray(first_reference), []
    for start in range(0, masked.shape[1], chunk_frames):
        end = start + chunk_frames
        latents, refs = sampler(masked[:, start:end], audio[:, start:end], refs, rng, start)
        out.append(np.asarray(latents))
    return np.concatenate(out, axis=1)
