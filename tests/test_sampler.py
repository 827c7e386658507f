"""The compiled DiT sampler (diffusion/sampler.py) on the 8 simulated devices: sharded ==
one device, chunked DiT calls == whole calls, a clip in frame chunks == the clip in one
piece, a bounded number of compiled programs, and each device computing only its share of
the slots (read from the compiled program)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_ddim import SCHEDULE, clip_inputs, tiny_dit

from dithead_jax import sharding
from dithead_jax.diffusion.sampler import DiTSampler, SamplerOptions, bucket, sample_in_chunks

STEPS = 4


def make_sampler(mesh_devices: int = 8, **options) -> DiTSampler:
    graphdef, state, _ = tiny_dit()
    mesh = sharding.make_mesh("dp", jax.devices()[:mesh_devices])
    options = SamplerOptions(num_steps=STEPS, **options)
    return DiTSampler(nnx.merge(graphdef, state), SCHEDULE, options, mesh=mesh)


def assert_close(got, want, what: str) -> None:
    want = np.asarray(want)
    scale = np.abs(want).max()
    assert np.isfinite(want).all() and want.std() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * scale, err_msg=what)


@pytest.fixture(scope="module")
def clip():
    return clip_inputs(1, 7, tiny_dit()[2].input_size, seed=3)


@pytest.mark.parametrize(
    "mode, order", [("x0_same_step", "wavefront"), ("noisy_same_step", "parallel")]
)
def test_sharded_and_row_chunked_equal_one_device(clip, mode, order):
    """The slot rows split over 8 devices, and split into DiT calls of at most 3 rows (one
    device) or 8 rows (8 devices: the parallel order's 7 slots padded to 8 per call), give
    the one-device, one-call samples."""
    masked, audio, first = clip
    key = jax.random.key(5)
    want, want_refs = make_sampler(1, mode=mode, order=order)(masked, audio, first, key)
    for devices, max_batch in ((8, None), (1, 3), (8, 8)):
        sampler = make_sampler(devices, mode=mode, order=order, max_batch=max_batch)
        got, refs = sampler(masked, audio, first, key)
        assert_close(got, want, f"{devices} devices, max_batch {max_batch}")
        assert_close(refs, want_refs, f"references, {devices} devices, max_batch {max_batch}")


@pytest.mark.parametrize(
    "mode, order, options",
    [
        ("x0_same_step", "wavefront", {}),
        ("x0_same_step", "wavefront", {"eta": 0.8}),
        ("x0_same_step", "wavefront", {"solver": "unipc"}),
        ("noisy_same_step", "parallel", {"solver": "dpmpp_2m"}),
        ("noisy_same_step", "wavefront", {}),
        ("fixed", "parallel", {}),
        ("final", "nested", {}),
    ],
)
def test_a_clip_in_frame_chunks_equals_the_whole_clip(clip, mode, order, options):
    """Chunks of 3 frames (the last one short and padded to its bucket), each continuing
    from the previous chunk's last frame at every step, reproduce the one-call clip."""
    masked, audio, first = clip
    sampler = make_sampler(8, mode=mode, order=order, **options)
    key = jax.random.key(11)
    whole, _ = sampler(masked, audio, first, key)
    chunked = sample_in_chunks(sampler, masked, audio, first, key, chunk_frames=3)
    assert_close(chunked, whole, f"{mode} {order} {options}")


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_multistep_solvers_agree_across_orders(clip, solver):
    """A solver's per-frame history travels with its frame: the wavefront (frames at
    different steps in one call) and the parallel order equal the nested loop."""
    masked, audio, first = clip
    key = jax.random.key(2)
    for mode, orders in (("x0_same_step", ["wavefront"]), ("noisy_same_step", ["parallel"])):
        nested, _ = make_sampler(1, mode=mode, order="nested", solver=solver)(
            masked, audio, first, key
        )
        for order in orders:
            got, _ = make_sampler(8, mode=mode, order=order, solver=solver)(
                masked, audio, first, key
            )
            assert_close(got, nested, f"{solver} {mode} {order}")


def test_compiled_programs_are_bounded_by_the_buckets(clip):
    """Ten clips of ten lengths compile one program per bucket (8 and 16 here), not one
    per clip."""
    _, _, first = clip
    sampler = make_sampler(8, mode="x0_same_step")
    lengths = (5, 9, 12, 17, 21, 26, 30, 35, 40, 47)
    size = tiny_dit()[2].input_size
    for n in lengths:
        masked, audio, _ = clip_inputs(1, n, size, seed=n)
        out = sample_in_chunks(sampler, masked, audio, first, jax.random.key(0), 16)
        assert out.shape == masked.shape
    chunks = {min(16, n - s) for n in lengths for s in range(0, n, 16)}
    assert {bucket(c) for c in chunks} == {8, 16}
    assert sampler.traces == 2


def test_each_device_computes_its_share_of_the_slots():
    """16 frames in the parallel order: 16 slots per DiT call, 2 per device on the dp mesh
    of 8 (every attention buffer (rows, heads, L, L) holds 2 rows), none on one device for
    all; max_batch 8 makes two calls of 8 slots, 1 row per device each."""
    cfg = tiny_dit()[2]
    tokens, heads = (cfg.input_size // cfg.patch_size) ** 2, cfg.num_heads
    spec = jax.ShapeDtypeStruct
    masked = spec((1, 16, cfg.input_size, cfg.input_size, 3), jnp.float32)
    audio = spec((1, 16, 11, 33), jnp.float32)
    first = spec((1, cfg.input_size, cfg.input_size, 3), jnp.float32)
    for max_batch, rows in ((None, 2), (8, 1)):
        sampler = make_sampler(8, mode="noisy_same_step", order="parallel", max_batch=max_batch)
        hlo = sampler.lower(masked, audio, first).compile().as_text()
        # XLA drops a leading 1: one row per device shows as (heads, L, L).
        scores = re.findall(rf"\bf32\[(\d+,)?{heads},{tokens},{tokens}\]", hlo)
        assert scores, "no (rows, heads, L, L) attention buffers in the compiled sampler"
        assert {int(r[:-1] or 1) for r in scores} == {rows}, f"max_batch {max_batch}"
        # Devices exchange latents only (the previous frame's, for noisy_same_step; the
        # updated slots): nothing of the DiT's width crosses between them.
        ops = r" (all-to-all|all-gather|all-reduce|collective-permute|reduce-scatter)\("
        moved = [line.split("=")[1] for line in hlo.splitlines() if re.search(ops, line)]
        shapes = [m.split(",") for line in moved for m in re.findall(r"\[([\d,]+)\]", line)]
        widths = {int(shape[-1]) for shape in shapes}
        assert moved and cfg.hidden_size not in widths, widths
