"""Per-frame random mask shifts, E_m's own latent statistics, and DiffTalk's landmark
condition, from stage-1 records through encode_latents, the stage-2 pipeline, one DiT
training step and the sampler's landmark packing.

The stage-1 records are real synthetic faces with their landmarks (so the masks are real);
E and E_m are two different fixed functions (4x4 average pooling, E_m rescaled), which
keeps the encode cheap while the statistics of the two differ, as a trained pair's do.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from stage2_data import dit_testing_config, write_random_stage2

from dithead_jax.config import CONDITION_LANDMARKS, DataConfig, DiTConfig, SyntheticConfig
from dithead_jax.data import pipelines, records
from dithead_jax.data.latents import (
    LatentJob,
    condition_landmarks,
    encode_dataset,
    frame_shifts,
    masked_statistics,
)
from dithead_jax.data.masks import apply_mask, lower_face_mask, shifted_masked_frames
from dithead_jax.models.dit import DiT
from dithead_jax.synthetic.dataset import render_synthetic_clip
from dithead_jax.training import dit_step, dit_train

SIZE = 64  # -> 16x16x3 latents: configs/dit.py:testing's input size
K = 3
FRAMES = 16  # per video (0.64 s at 25 fps)


def encode_frames(frames: np.ndarray) -> np.ndarray:
    x = frames.astype(np.float32) / 127.5 - 1.0
    n = len(x)
    return x.reshape(n, SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(2, 4))


def encode_masked(frames: np.ndarray) -> np.ndarray:
    return 3.0 * encode_frames(frames) + np.float32([0.5, -0.25, 1.0])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    cfg = DataConfig(image_size=SIZE)
    writer = records.DatasetWriter(
        out, "stage1", image_size=SIZE, audio_window=11, audio_dim=33, image_encoding="png"
    )
    syn = SyntheticConfig(identities=1, clips=2, seconds=FRAMES / 25, size=SIZE, seed=3)
    for clip in range(2):
        rendered, _, _ = render_synthetic_clip(syn, 0, clip)
        frames, lm = rendered.frames[:FRAMES], rendered.landmarks[:FRAMES].astype(np.float32)
        alpha = np.stack([lower_face_mask(p, SIZE, cfg) for p in lm])
        masked = np.stack([apply_mask(f, m) for f, m in zip(frames, alpha, strict=True)])
        writer.write_video(
            "train",
            f"clip{clip}",
            {
                "frame": frames,
                "masked_frame": masked,
                "mask": alpha,
                "landmarks": lm,
                "crop_box": np.zeros((len(frames), 4), np.float32),
                "source_size": np.full((len(frames), 2), SIZE, np.int32),
                "audio": np.random.default_rng(clip).normal(size=(len(frames), 11, 33)),
            },
            identity="id0",
        )
    writer.finalize()
    return out


def _job(stage1, out, **kw) -> LatentJob:
    return LatentJob(stage1=stage1, out=out, vqgan_workdir="E", vqgan_masked_workdir="Em",
                     num_masked=K, stats_frames=10_000, seed=7, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    encode_dataset(_job(stage1, out), encode_frames, encode_masked, progress=False)
    return out


def test_offsets_differ_per_frame_and_variant_and_are_reproducible():
    shifts = frame_shifts("clipA", np.arange(50), 4, max_shift=2.0, seed=0)
    assert shifts.shape == (50, 4, 2) and shifts.dtype == np.float32
    assert np.all(shifts[:, 0] == 0)  # variant 0: the dataset's own mask
    assert np.abs(shifts).max() <= 2.0
    drawn = shifts[:, 1:].reshape(-1, 2)
    assert len(np.unique(drawn, axis=0)) == len(drawn)  # no offset repeats
    again = frame_shifts("clipA", np.arange(50), 4, max_shift=2.0, seed=0)
    np.testing.assert_array_equal(shifts, again)
    other_video = frame_shifts("clipB", np.arange(50), 4, max_shift=2.0, seed=0)
    other_seed = frame_shifts("clipA", np.arange(50), 4, max_shift=2.0, seed=1)
    assert not np.any(other_video[:, 1:] == shifts[:, 1:])
    assert not np.any(other_seed[:, 1:] == shifts[:, 1:])
    # Uniform, not clustered: both signs, spread over the range.
    assert drawn.std() > 0.9 and (drawn < 0).mean() > 0.35


def test_records_hold_the_shifts_landmarks_and_em_normalised_variants(stage1, stage2):
    meta = records.dataset_metadata(stage2)
    prov = meta["provenance"]
    assert meta["mask_shifts"] is True and meta["num_landmarks"] == len(CONDITION_LANDMARKS)
    frames, _ = records.open_dataset(stage1, "train")
    codes, features = records.open_dataset(stage2, "train")
    assert {"mask_shifts", "landmarks"} <= set(features)
    # E_m's statistics: those of E_m's latents of the unshifted masked training frames (all
    # 32 here), not E's.
    data = DataConfig(image_size=SIZE)
    unshifted = np.zeros((1, 2), np.float32)
    masked0 = np.stack(
        [shifted_masked_frames(r["frame"], r["landmarks"], unshifted, data)[0] for r in frames]
    )
    z = encode_masked(masked0).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(prov["masked_latent_mean"], z.mean(0), rtol=1e-5)
    np.testing.assert_allclose(prov["masked_latent_std"], z.std(0), rtol=1e-5)
    assert not np.allclose(prov["masked_latent_std"], prov["latent_std"], rtol=0.5)
    m_mean, m_std = masked_statistics(prov)
    index = records.load_video_index(stage2, "train")
    seen = []
    for pos in (0, FRAMES + 5):
        frame, code = frames[pos], codes[pos]
        video = str(index["video_id"][np.searchsorted(index["start"], pos, side="right") - 1])
        shifts = frame_shifts(video, [frame["frame_index"]], K, prov["mask_shift_max"], 7)[0]
        np.testing.assert_array_equal(code["mask_shifts"], shifts)
        seen.append(shifts)
        variants = shifted_masked_frames(frame["frame"], frame["landmarks"], shifts, data)
        want = (encode_masked(variants) - m_mean) / m_std
        np.testing.assert_allclose(code["masked_latents"], want, atol=4e-3, rtol=2e-3)
        np.testing.assert_allclose(
            code["landmarks"], condition_landmarks(frame["landmarks"], SIZE), rtol=1e-6
        )
        assert code["landmarks"].shape == (len(CONDITION_LANDMARKS), 2)
    assert not np.allclose(seen[0][1:], seen[1][1:])  # another frame, other offsets


def test_a_rerun_reproduces_the_records_and_old_datasets_are_not_resumed(stage1, stage2, tmp_path):
    again = tmp_path / "again"
    encode_dataset(_job(stage1, again), encode_frames, encode_masked, progress=False)
    a, _ = records.open_dataset(stage2, "train")
    b, _ = records.open_dataset(again, "train")
    for pos in (3, 2 * FRAMES - 1):
        for key in ("mask_shifts", "masked_latents", "latent"):
            np.testing.assert_array_equal(a[pos][key], b[pos][key])
    old = tmp_path / "old"
    old.mkdir()
    writer = json.loads((stage2 / "writer.json").read_text())
    for key in ("mask_shift_max", "mask_shift_seed", "masked_latent_mean", "masked_latent_std"):
        writer["provenance"].pop(key)
    (old / "writer.json").write_text(json.dumps(writer))
    with pytest.raises(ValueError, match="older encode_latents.py"):
        encode_dataset(_job(stage1, old), encode_frames, encode_masked, progress=False)
    # ... but such a dataset still loads: its masked latents were normalised with E's.
    mean, std = masked_statistics(writer["provenance"])
    np.testing.assert_array_equal(mean, np.float32(writer["provenance"]["latent_mean"]))
    np.testing.assert_array_equal(std, np.float32(writer["provenance"]["latent_std"]))


def test_pipeline_emits_the_targets_landmarks_and_old_records_still_serve(stage2, tmp_path):
    batch = next(
        iter(pipelines.dit_dataset(stage2, batch_size=4, seed=1, min_reference_distance=4,
                                   with_landmarks=True, shuffle=False))
    )  # fmt: skip
    codes, _ = records.open_dataset(stage2, "train")
    assert batch["landmarks"].shape == (4, len(CONDITION_LANDMARKS), 2)
    for i in range(4):  # unshuffled: row i is record i, the target (DiffTalk's choice)
        np.testing.assert_array_equal(batch["landmarks"][i], codes[i]["landmarks"])
        np.testing.assert_array_equal(batch["latent"][i], codes[i]["latent"].astype(np.float32))
        assert any(
            np.array_equal(batch["masked_latent"][i], v.astype(np.float32))
            for v in codes[i]["masked_latents"]
        )
    old = write_random_stage2(tmp_path / "old", videos=1, frames=8)
    plain = next(iter(pipelines.dit_dataset(old, batch_size=4, min_reference_distance=2)))
    assert "landmarks" not in plain
    with pytest.raises(ValueError, match="no 'landmarks'.*encode_latents"):
        pipelines.dit_dataset(old, batch_size=4, with_landmarks=True)


def test_landmark_token_model_and_the_samplers_packing():
    from dithead_jax.sampling import _WithLandmarks, pack_landmarks

    cfg = DiTConfig.testing(input_size=8, hidden_size=32, depth=1, landmark_tokens=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 8, 8, 9)), jnp.float32)
    t = jnp.array([1, 500, 999])
    audio = rng.normal(size=(3, 11, 33)).astype(np.float32)
    lm = rng.uniform(size=(3, len(CONDITION_LANDMARKS), 2)).astype(np.float32)
    with pytest.raises(ValueError, match="needs `landmarks`"):
        jax.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))(x, t, audio))
    fresh = jax.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))(x, t, audio, landmarks=lm))
    assert fresh.shape == (3, 8, 8, 3)
    # The sampler's view: landmarks ride in extra rows of the audio window; the same
    # frames twice, the second time with other landmarks.
    packed = pack_landmarks(np.concatenate([audio, audio]), np.concatenate([lm, lm[::-1]]))
    assert packed.shape == (6, 11 + 3, 33)  # 78 coordinates -> 3 rows of 33

    def outputs(packed):
        dit = DiT(cfg, rngs=nnx.Rngs(0))
        # Every parameter moved off its (often zero) init, so every path carries signal.
        graphdef, state = nnx.split(dit)
        leaves, tree = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        moved = [
            a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)
        ]
        dit = nnx.merge(graphdef, jax.tree.unflatten(tree, moved))
        wrapped = _WithLandmarks(dit, 11)
        return dit(x, t, audio, landmarks=lm), wrapped(
            jnp.concatenate([x, x]), jnp.tile(t, 2), packed
        )

    # Built and run in one program: eager init and updates cost ~30 s on this CPU.
    run = jax.jit(outputs).lower(jnp.asarray(packed)).compile(dit_step.FAST_COMPILE_CPU)
    direct, via_sampler = run(jnp.asarray(packed))
    np.testing.assert_allclose(via_sampler[:3], direct, atol=1e-5)
    assert not np.allclose(via_sampler[3:], direct, atol=1e-4)  # the landmarks matter


def test_a_batch_with_landmarks_trains(stage2):

    config = dit_testing_config(stage2)
    config.model.landmark_tokens = True
    config.data.min_reference_distance = 4
    config.train.global_batch_size = 8
    task = dit_train.build_task(config, compiler_options=dit_step.FAST_COMPILE_CPU)
    run = dit_train.DiTRun.from_config(config)
    assert "landmarks" in dit_step.batch_keys(run.diffusion, run.model)
    assert "landmarks" not in dit_step.batch_keys(run.diffusion, DiTConfig.testing())

    def embedder(state):
        return np.asarray(jax.device_get(state.params["landmark_embedder"]["fc1"]["kernel"]))

    state, before = task.state, embedder(task.state)
    # Zero-initialised outputs pass gradient one layer per step: step 1 moves the final
    # layer, step 2 the cross-attention output, step 3 what feeds it.
    for _ in range(3):
        state, metrics = task.train_step(state, task.to_global(next(task.batches)))
        assert np.isfinite(float(metrics["loss"]))
    assert not np.allclose(embedder(state), before)  # the gradient reached the landmarks
