"""The trained sync expert: its InfoNCE loss, training step, 5-frame windows, LSE from it,
and the sync loss it puts on the DiT."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.sync_expert import get_config
from dithead_jax import config as cfg
from dithead_jax.data.sync_windows import shifted_position, window_starts
from dithead_jax.evaluation import sync
from dithead_jax.models.sync_expert import SyncExpert, info_nce, lower_half
from dithead_jax.training import loop, sync_expert_train
from dithead_jax.training.dit_step import FAST_COMPILE_CPU


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_info_nce_known_answer():
    # Orthonormal lips = audio, shifted audio orthogonal to its lips: every logit is 1/tau
    # on the diagonal and 0 elsewhere, over b + 1 candidates.
    b, tau = 4, 0.25
    eye = jnp.eye(8)[:b]
    shifted = jnp.eye(8)[b : 2 * b]
    loss, aux = info_nce(eye, eye, shifted, tau)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + b))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(aux["accuracy"]) == 1.0 and float(aux["offset_accuracy"]) == 1.0
    # The shifted audio equal to the lips: offset accuracy 0 (a tie is not a win).
    _, aux = info_nce(eye, eye, eye, tau)
    assert float(aux["offset_accuracy"]) == 0.0


def test_lower_half_stacks_frames_frame_major():
    frames = jnp.arange(2 * 5 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 5, 4, 4, 3)
    out = lower_half(frames)
    assert out.shape == (2, 2, 4, 15)
    # channel 3 t + c of row r is frame t's colour c of row 2 + r
    np.testing.assert_array_equal(out[1, 0, 3, 3 * 4 + 2], frames[1, 4, 2, 3, 2])


def test_window_starts_and_offsets():
    # Two videos of 7 and 4 records; the second has a gap (frame 2 missing).
    index = {
        "start": np.array([0, 7]),
        "length": np.array([7, 4]),
        "frame_index": np.array([0, 1, 2, 3, 4, 5, 6, 0, 1, 3, 4]),
    }
    np.testing.assert_array_equal(window_starts(index), [0, 1, 2])
    rng = np.random.default_rng(0)
    draws = {shifted_position(3, 0, 7, 2, 15, rng) for _ in range(200)}
    assert draws == {0, 1, 5, 6}  # |offset| >= 2 inside the video, both sides
    assert shifted_position(0, 0, 3, 5, 15, rng) == 2  # none far enough: the farthest


def test_expert_lse_finds_the_offset():
    rng = np.random.default_rng(0)
    w, e, lag = 40, 16, 3
    lips = _unit(rng.normal(size=(w, e)))
    audio = _unit(rng.normal(size=(w, e)))
    audio[lag:] = lips[:-lag]  # lips_i belongs with audio_{i + lag}: the video leads
    mean = sync.expert_mean_distances(lips, audio, vshift=15)
    scores = sync.scores_from_mean_distances(mean, w, 15)
    assert scores["offset"] == -lag
    assert abs(scores["lse_d"]) < 1e-9  # 1 - cos of identical vectors
    finite = np.sort(mean[np.isfinite(mean)])
    np.testing.assert_allclose(scores["lse_c"], finite[(len(finite) - 1) // 2])
    # In sync: offset 0.
    scores = sync.scores_from_mean_distances(sync.expert_mean_distances(lips, lips, 15), w, 15)
    assert scores["offset"] == 0


def _toy_batches(batch: int, size: int, seed: int = 0):
    """Lip frames whose lower half brightness follows a per-example signal that the audio
    window carries too; the shifted audio carries another signal."""
    rng = np.random.default_rng(seed)
    while True:
        signal = rng.uniform(-1, 1, (batch, 5))
        other = rng.uniform(-1, 1, (batch, 5))
        frames = np.zeros((batch, 5, size, size, 3), np.float32)
        frames[:, :, size // 2 :] = signal[:, :, None, None, None]
        audio = np.zeros((batch, 11, 33), np.float32)
        shifted = np.zeros_like(audio)
        audio[:, 3:8] = signal[:, :, None]
        shifted[:, 3:8] = other[:, :, None]
        yield {"frames": frames, "audio": audio, "shifted_audio": shifted}


def test_expert_trains_checkpoints_and_scores(tmp_path):
    config = get_config("testing")
    config.train.num_steps = 8
    config.train.checkpoint_every = 8
    config.train.progress = "none"
    batches = _toy_batches(8, 32)
    fixed = next(batches)
    task = sync_expert_train.build_task(
        config, batches=itertools.repeat(fixed), compiler_options=FAST_COMPILE_CPU
    )
    result = loop.run(task, sync_expert_train.SyncExpertRun.from_config(config).train, tmp_path)
    losses = [result.losses[s] for s in sorted(result.losses)]
    # The loop stops on a non-finite loss or gradient norm: all 8 steps ran.
    assert sorted(result.losses) == list(range(1, 9)) and all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses

    model, run = sync_expert_train.load_expert(tmp_path)
    assert run.model == cfg.SyncExpertConfig(**dict(config.model))
    scorer = sync.make_sync_scorer(tmp_path)
    if sync.SyncScorer().available:  # syncnet_v2.model installed: it takes precedence
        scorer = sync.TrainedSyncScorer(tmp_path)
    assert isinstance(scorer, sync.TrainedSyncScorer)
    frames = np.random.default_rng(1).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    audio = np.random.default_rng(2).uniform(-0.5, 0.5, 24 * 640).astype(np.float32)
    scores = scorer(frames, audio)
    assert scores["status"] == "ok" and scores["num_windows"] == 20
    assert scores["expert"] == f"trained expert {tmp_path}"
    assert -15 <= scores["offset"] <= 15 and scores["lse_c"] >= 0
    with pytest.raises(ValueError, match="too short"):
        scorer(frames[:3], audio)
    windows = np.zeros((24, 11, 33), np.float32)
    lips, auds = scorer.embeddings(frames, windows)
    assert lips.shape == auds.shape == (20, 16)
    np.testing.assert_allclose(np.linalg.norm(lips, axis=-1), 1.0, rtol=1e-5)


def test_mean_lse_keeps_the_expert_name():
    from dithead_jax.evaluation import evaluate as ev

    clips = [{"status": "ok", "lse_c": c, "lse_d": d, "expert": "trained expert W"}
             for c, d in ((1.0, 4.0), (2.0, 6.0))]  # fmt: skip
    mean = ev._mean_lse(clips)
    assert (mean["lse_c"], mean["lse_d"], mean["expert"]) == (1.5, 5.0, "trained expert W")


def test_sync_expert_config_refuses_bad_values():
    with pytest.raises(cfg.ConfigError, match="max_offset"):
        cfg.SyncExpertConfig(min_offset=4, max_offset=3)
    with pytest.raises(cfg.ConfigError, match="image_size"):
        cfg.SyncExpertConfig(image_size=48)  # 4 stride-2 stages need a multiple of 32
    config = get_config("testing")
    config.data.image_size = 64
    with pytest.raises(cfg.ConfigError, match="image_size"):
        sync_expert_train.SyncExpertRun.from_config(config)


# ---------------------------------------------------------------------------------------
# The sync loss on the DiT


@pytest.fixture(scope="module")
def sync_nets():
    """A tiny DiT (8x8x3 latents), frame VQGAN (32^2) and expert: (graphdefs, states),
    initialised in one jit (eager init compiles a sampler per weight shape: ~40 s)."""
    from dithead_jax.models.dit import DiT
    from dithead_jax.models.vqgan import VQGAN

    expert_cfg = cfg.SyncExpertConfig(image_size=32, lip_channels=(8, 16), audio_channels=(8,),
                                      embed_dim=8)  # fmt: skip

    def make():
        return (
            DiT(cfg.DiTConfig.testing(input_size=8, depth=1, hidden_size=32), rngs=nnx.Rngs(0)),
            VQGAN(
                cfg.VQGANConfig.testing(ch=8, norm_groups=4, codebook_size=16, mid_attention=False),
                rngs=nnx.Rngs(1),
            ),
            SyncExpert(expert_cfg, 11, 33, rngs=nnx.Rngs(2)),
        )

    graphdefs = [nnx.split(m)[0] for m in nnx.eval_shape(make)]
    init = jax.jit(lambda: [nnx.split(m)[1] for m in make()], compiler_options=FAST_COMPILE_CPU)
    return graphdefs, init()


def _sync_setup(sync_nets, max_timestep: int):
    """(DiT graphdef, its params, the SyncLoss, its frozen weights, DiffusionConfig)."""
    from dithead_jax.diffusion import schedule as diffusion
    from dithead_jax.training.sync_loss import SyncLoss

    (dit_def, vqgan_def, expert_def), (dit_state, vqgan_state, expert_state) = sync_nets
    diffusion_cfg = cfg.DiffusionConfig()
    loss = SyncLoss(
        cfg=cfg.SyncLossConfig(weight=2.0, max_timestep=max_timestep),
        expert_graphdef=expert_def,
        vqgan_graphdef=vqgan_def,
        schedule=diffusion.make_schedule(diffusion_cfg),
        prediction=diffusion_cfg.prediction,
        image_size=32,
    )
    frozen = {"expert": expert_state, "vqgan": vqgan_state,
              "mean": jnp.full((3,), 0.1), "std": jnp.full((3,), 2.0)}  # fmt: skip
    return dit_def, dit_state, loss, frozen, diffusion_cfg


def _dit_batch(b: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    z = lambda: rng.normal(size=(b, 8, 8, 3)).astype(np.float32)  # noqa: E731
    return {"latent": z(), "masked_latent": z(), "reference_latent": z(),
            "audio": rng.normal(size=(b, 11, 33)).astype(np.float32)}  # fmt: skip


def test_sync_loss_gradient_reaches_the_dit_not_the_frozen_nets(sync_nets):
    from dithead_jax.training.dit_step import dit_loss

    # max_timestep 1000: every t counts
    graphdef, params, sync_loss, frozen, diffusion_cfg = _sync_setup(sync_nets, 1000)
    batch = _dit_batch(10)  # two runs of 5

    def sync_part(params, frozen):
        model = nnx.merge(graphdef, params)
        loss, aux = dit_loss(model, batch, jax.random.key(0), sync_loss.schedule,
                             diffusion_cfg.prediction)  # fmt: skip
        total, aux = sync_loss.add_to(loss, aux, batch, frozen)
        return total - loss, aux

    grad_fn = jax.jit(jax.grad(sync_part, argnums=(0, 1), has_aux=True),
                      compiler_options=FAST_COMPILE_CPU)  # fmt: skip
    (g_params, g_frozen), aux = grad_fn(params, frozen)
    assert float(aux["sync_loss"]) > 0 and float(aux["sync_share"]) == 1.0
    dit_norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(g_params))
    assert np.isfinite(dit_norm) and dit_norm > 0
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(g_frozen))


def test_sync_loss_only_below_the_timestep_threshold(sync_nets):
    _, _, sync_loss, frozen, _ = _sync_setup(sync_nets, 100)
    batch = _dit_batch(10)
    x0_hat = jnp.asarray(np.random.default_rng(3).normal(size=(10, 8, 8, 3)), jnp.float32)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE_CPU)
    def value_and_grad(x0_hat, t):
        def f(x):
            return sync_loss(frozen, x, batch["latent"], t, batch["audio"])

        return jax.value_and_grad(f, has_aux=True)(x0_hat)

    above = jnp.full((10,), 100)  # t >= max_timestep everywhere: nothing to judge
    (loss, aux), grad = value_and_grad(x0_hat, above)
    assert float(loss) == 0.0 and float(jnp.max(jnp.abs(grad))) == 0.0
    # Run 0 has frames 1 and 3 under the threshold, run 1 none: only those two frames get
    # a gradient, and the loss is weight * (2/5) * d_0 / 2.
    t = jnp.asarray([500, 99, 500, 0, 500] + [999] * 5)
    (loss, aux), grad = value_and_grad(x0_hat, t)
    per_frame = np.asarray(jnp.max(jnp.abs(grad), axis=(1, 2, 3)))
    assert (per_frame[[1, 3]] > 0).all() and (per_frame[[0, 2, 4, 5, 6, 7, 8, 9]] == 0).all()
    np.testing.assert_allclose(float(loss), 2.0 * 0.4 * float(aux["sync_distance"]) / 2, rtol=1e-5)


def test_sync_loss_skips_frames_generated_without_audio(sync_nets):
    _, _, sync_loss, frozen, _ = _sync_setup(sync_nets, 1000)
    batch = {k: jnp.asarray(v) for k, v in _dit_batch(10).items()}
    t = jnp.zeros((10,), jnp.int32)  # every frame under the threshold

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE_CPU)
    def sync_term(drop):
        # Any prediction works here: what is tested is the gate on dit_loss's drop_audio.
        aux = {"x_t": batch["latent"], "t": t, "prediction": 0.5 * batch["latent"],
               "drop_audio": drop}  # fmt: skip
        return sync_loss.add_to(jnp.zeros(()), aux, batch, frozen)[1]["sync_loss"]

    assert float(sync_term(jnp.zeros((10,), bool))) > 0
    assert float(sync_term(jnp.ones((10,), bool))) == 0.0
