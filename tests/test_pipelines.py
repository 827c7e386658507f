"""Grain pipelines: shapes, reference-frame rule, host rows of global batches (the same
batches for any process count), determinism, exact resume."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dithead_jax.data import pipelines, records

S, W, D, LATENT, K = 16, 11, 3, (4, 4, 2), 3
MIN_DIST = 60
# (video_id, identity, frame indices): a long video, one with gaps (no face detected on odd
# frames), and one shorter than the reference distance.
STAGE2_VIDEOS = [
    ("long", "p", np.arange(130)),
    ("gappy", "q", np.arange(0, 140, 2)),
    ("short", "r", np.arange(12)),
]


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stage1")
    w = records.DatasetWriter(
        path, "stage1", image_size=S, audio_window=W, audio_dim=D, image_encoding="png"
    )
    rng = np.random.default_rng(0)
    for v, t in enumerate((7, 9)):
        w.write_video(
            "train",
            f"v{v}",
            {
                "frame": rng.integers(0, 256, (t, S, S, 3), dtype=np.uint8),
                "masked_frame": rng.integers(0, 256, (t, S, S, 3), dtype=np.uint8),
                "mask": rng.integers(0, 256, (t, S, S), dtype=np.uint8),
                "landmarks": np.zeros((t, 68, 2), np.float32),
                "crop_box": np.zeros((t, 4), np.float32),
                "source_size": np.ones((t, 2), np.int32),
                "audio": rng.normal(size=(t, W, D)).astype(np.float32),
            },
            identity=f"id{v}",
        )
    return w.finalize()


@pytest.fixture(scope="module")
def stage2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stage2")
    w = records.DatasetWriter(
        path, "stage2", latent_shape=LATENT, num_masked=K, audio_window=W, audio_dim=D
    )
    rng = np.random.default_rng(1)
    for video_id, identity, frames in STAGE2_VIDEOS:
        t = len(frames)
        w.write_video(
            "train",
            video_id,
            {
                "latent": rng.normal(size=(t, *LATENT)).astype(np.float16),
                "masked_latents": rng.normal(size=(t, K, *LATENT)).astype(np.float16),
                "mask": rng.integers(0, 256, (t, *LATENT[:2]), dtype=np.uint8),
                "audio": rng.normal(size=(t, W, D)).astype(np.float32),
                "frame_index": frames,
            },
            identity=identity,
        )
    return w.finalize()


def take(ds, n):
    return list(itertools.islice(iter(ds), n))


def stage2_lookup(stage2_dir):
    """Every record's audio, latent, masked latents, video and frame index, by position."""
    source, _ = records.open_dataset(stage2_dir, "train")
    rows = [source[i] for i in range(len(source))]
    return {
        "audio": np.stack([r["audio"] for r in rows]),
        "latent": np.stack([r["latent"] for r in rows]).astype(np.float32),
        "masked": np.stack([r["masked_latents"] for r in rows]).astype(np.float32),
        "mask": np.stack([r["mask"] for r in rows]).astype(np.float32) / 255.0,
        "video": np.array([r["video_id"] for r in rows]),
        "frame": np.array([r["frame_index"] for r in rows]),
    }


def positions_of(audio_batch, lookup):
    """Record positions of a batch, found by its (unique, random) audio windows."""
    flat = lookup["audio"].reshape(len(lookup["audio"]), -1)
    out = []
    for a in audio_batch.reshape(len(audio_batch), -1):
        (hit,) = np.flatnonzero((flat == a).all(axis=1))
        out.append(int(hit))
    return out


def test_vqgan_batches(stage1_dir):
    source, _ = records.open_dataset(stage1_dir, "train")
    for target, key in (("frames", "frame"), ("masked", "masked_frame")):
        ds = pipelines.vqgan_dataset(
            stage1_dir,
            batch_size=4,
            target=target,
            shuffle=False,
            random_flip=False,
        )
        batch = take(ds, 1)[0]
        assert batch["image"].shape == (4, S, S, 3) and batch["image"].dtype == np.float32
        want = np.stack([source[i][key] for i in range(4)]) / 127.5 - 1.0
        np.testing.assert_allclose(batch["image"], want, atol=1e-6)
    # 16 records / 4 = 4 batches per epoch; flips happen and only ever mirror.
    ds = pipelines.vqgan_dataset(stage1_dir, batch_size=4, seed=3, num_epochs=1)
    images = np.concatenate([b["image"] for b in take(ds, 10)])
    assert len(images) == 16 and images.min() >= -1.0 and images.max() <= 1.0
    originals = [source[i]["frame"] / 127.5 - 1.0 for i in range(16)]
    flipped = 0
    for image in images:
        same = [np.allclose(image, o, atol=1e-6) for o in originals]
        mirrored = [np.allclose(image, o[:, ::-1], atol=1e-6) for o in originals]
        assert sum(same) + sum(mirrored) == 1
        flipped += sum(mirrored)
    assert 0 < flipped < 16
    # Random crops: windows of the frames, at varying places.
    crop = S // 2
    ds = pipelines.vqgan_dataset(
        stage1_dir, batch_size=4, crop=crop, random_flip=False, shuffle=False,
        num_epochs=1,
    )  # fmt: skip
    images = np.concatenate([b["image"] for b in take(ds, 4)])
    assert images.shape == (16, crop, crop, 3)
    places = set()
    for image, original in zip(images, originals, strict=True):
        windows = [(y, x) for y in range(S - crop + 1) for x in range(S - crop + 1)]
        found = [
            (y, x)
            for y, x in windows
            if np.allclose(image, original[y : y + crop, x : x + crop], atol=1e-6)
        ]
        assert found
        places.add(found[0])
    assert len(places) > 4
    # with_mask: each example's alpha is cut and mirrored exactly like its image.
    ds = pipelines.vqgan_dataset(
        stage1_dir, batch_size=4, crop=crop, with_mask=True, shuffle=False,
        num_epochs=1,
    )  # fmt: skip
    batches = take(ds, 4)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.shape == (16, crop, crop) and masks.dtype == np.float32
    assert masks.min() >= 0.0 and masks.max() <= 1.0 and masks.max() > 0.5
    images = np.concatenate([b["image"] for b in batches])
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        frame, alpha = originals[i], source[i]["mask"] / 255.0
        mirror = lambda a, flip: a[:, ::-1] if flip else a
        views = [
            (
                mirror(frame[y : y + crop, x : x + crop], flip),
                mirror(alpha[y : y + crop, x : x + crop], flip),
            )
            for y, x in windows
            for flip in (False, True)
        ]
        expected = [a for f, a in views if np.allclose(image, f, atol=1e-6)]
        assert expected and np.allclose(mask, expected[0], atol=1e-6)


def test_choose_reference_rules():
    rng = np.random.default_rng(0)
    frames = np.concatenate([np.arange(5), np.arange(100)])  # video 2 starts at 5
    for target in range(5, 105):
        ref = pipelines.choose_reference(target, 5, 100, frames, 60, rng)
        assert 5 <= ref < 105
        if frames[target] < 40 or frames[target] >= 60:
            assert abs(frames[ref] - frames[target]) >= 60
        else:  # mid-video frames 40..59 have nothing 60 away: the farthest end instead
            assert frames[ref] == (99 if frames[target] < 50 else 0)
    # Shorter than the distance: the farthest frame, deterministically.
    assert pipelines.choose_reference(1, 0, 5, frames, 60, rng) == 4
    assert pipelines.choose_reference(4, 0, 5, frames, 60, rng) == 0
    assert pipelines.choose_reference(3, 3, 1, frames, 60, rng) == 3  # one frame: itself
    # Every candidate gets drawn.
    refs = {pipelines.choose_reference(5, 5, 100, frames, 60, rng) for _ in range(400)}
    assert refs == set(range(65, 105))


def test_dit_batches_and_reference_rule(stage2_dir):
    lookup = stage2_lookup(stage2_dir)
    n = len(lookup["audio"])
    ds = pipelines.dit_dataset(
        stage2_dir,
        batch_size=8,
        seed=0,
        num_epochs=1,
        min_reference_distance=MIN_DIST,
    )
    batches = take(ds, 100)
    assert len(batches) == n // 8
    b = batches[0]
    for key in ("latent", "masked_latent", "reference_latent"):
        assert b[key].shape == (8, *LATENT) and b[key].dtype == np.float32
    assert b["audio"].shape == (8, W, D)
    variants_seen = set()
    for batch in batches:
        for i, pos in enumerate(positions_of(batch["audio"], lookup)):
            np.testing.assert_array_equal(batch["latent"][i], lookup["latent"][pos])
            (variant,) = [
                k
                for k in range(K)
                if np.array_equal(batch["masked_latent"][i], lookup["masked"][pos, k])
            ]
            variants_seen.add(variant)
            (ref,) = np.flatnonzero(
                (lookup["latent"] == batch["reference_latent"][i]).all(axis=(1, 2, 3))
            )
            assert lookup["video"][ref] == lookup["video"][pos]
            distance = abs(int(lookup["frame"][ref]) - int(lookup["frame"][pos]))
            if lookup["video"][pos] == b"short":
                assert distance == max(lookup["frame"][pos], 11 - lookup["frame"][pos])
            else:
                assert distance >= MIN_DIST
    assert variants_seen == set(range(K))
    assert "mask" not in b  # only asked for by a mask-weighted loss


def test_dit_batches_carry_the_targets_mask(stage2_dir):
    lookup = stage2_lookup(stage2_dir)
    ds = pipelines.dit_dataset(stage2_dir, batch_size=8, seed=3, with_mask=True, num_epochs=1)
    for batch in take(ds, 3):
        assert batch["mask"].shape == (8, *LATENT[:2]) and batch["mask"].dtype == np.float32
        for i, pos in enumerate(positions_of(batch["audio"], lookup)):
            np.testing.assert_array_equal(batch["mask"][i], lookup["mask"][pos])


def test_dit_batches_without_stored_masks_name_the_fix(tmp_path, stage2_dir, monkeypatch):
    # Latent records as the writer made them before masks were stored: no "mask" feature.
    make_features = records.make_features

    def old_features(*args, **kwargs):
        spec = make_features(*args, **kwargs)
        return records.tfds.features.FeaturesDict({k: v for k, v in spec.items() if k != "mask"})

    keys = ("latent", "masked_latents", "audio")
    monkeypatch.setattr(records, "make_features", old_features)
    monkeypatch.setattr(records, "_STAGE2_KEYS", keys)
    old = records.DatasetWriter(
        tmp_path, "stage2", latent_shape=LATENT, num_masked=K, audio_window=W, audio_dim=D
    )
    source, _ = records.open_dataset(stage2_dir, "train")
    rows = [source[i] for i in range(4)]
    old.write_video("train", "v", {k: np.stack([r[k] for r in rows]) for k in keys}, identity="p")
    with pytest.raises(ValueError, match="no 'mask'.*encode_latents"):
        pipelines.dit_dataset(old.finalize(), batch_size=2, with_mask=True)


def test_host_rows_split_the_global_batches(stage1_dir, stage2_dir):
    """Hosts read disjoint rows that together are exactly the one-process batches, random
    choices included (they depend on the global position, not on the host)."""
    lookup = stage2_lookup(stage2_dir)
    whole = take(pipelines.dit_dataset(stage2_dir, batch_size=8, seed=5, num_epochs=1), 100)
    assert len(whole) == len(lookup["audio"]) // 8
    positions = [p for b in whole for p in positions_of(b["audio"], lookup)]
    assert len(set(positions)) == len(positions)  # an epoch is a permutation
    for hosts in (2, 4):
        parts = []
        for h in range(hosts):
            rows = pipelines.default_host_rows(8, h, hosts)
            assert rows == (h * 8 // hosts, (h + 1) * 8 // hosts)
            ds = pipelines.dit_dataset(stage2_dir, batch_size=8, seed=5, host_rows=rows)
            parts.append(take(ds, len(whole) + 2))  # past the epoch boundary
        later = take(pipelines.dit_dataset(stage2_dir, batch_size=8, seed=5), len(whole) + 2)
        for k, want in enumerate(later):
            for key in want:
                got = np.concatenate([part[k][key] for part in parts])
                np.testing.assert_array_equal(got, want[key])
        for k in range(len(whole)):
            seen = [set(positions_of(part[k]["audio"], lookup)) for part in parts]
            assert all(len(a & b) == 0 for a in seen for b in seen if a is not b)
    # Stage 1 too, with random flips and crops.
    make = lambda rows: pipelines.vqgan_dataset(
        stage1_dir, batch_size=4, seed=1, crop=S // 2, host_rows=rows
    )
    want = take(make(None), 6)
    halves = [take(make((0, 2)), 6), take(make((2, 4)), 6)]
    for k in range(6):
        got = np.concatenate([halves[0][k]["image"], halves[1][k]["image"]])
        np.testing.assert_array_equal(got, want[k]["image"])


def test_host_rows_follow_the_batch_sharding():
    """One process holds every row; the per-process formula matches jax.make_mesh."""
    from dithead_jax.training.loop import host_rows

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    assert host_rows(sharding, 16) == (0, 16) == pipelines.default_host_rows(16)
    # The rows a process's devices hold: contiguous when its devices are (make_mesh).
    devices = set(jax.devices()[:4])
    held = sorted(
        r
        for d, index in sharding.devices_indices_map((16,)).items()
        if d in devices
        for r in range(16)[index[0]]
    )
    assert held == list(range(*pipelines.default_host_rows(16, 0, 2)))


def test_deterministic_for_a_seed(stage1_dir, stage2_dir):
    def run(seed):
        ds = pipelines.dit_dataset(stage2_dir, batch_size=4, seed=seed)
        return take(ds, 6)

    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["audio"], c[0]["audio"])
    ds1 = pipelines.vqgan_dataset(stage1_dir, batch_size=2, seed=9)
    ds2 = pipelines.vqgan_dataset(stage1_dir, batch_size=2, seed=9)
    for x, y in zip(take(ds1, 12), take(ds2, 12), strict=True):  # crosses an epoch boundary
        np.testing.assert_array_equal(x["image"], y["image"])


@pytest.mark.parametrize("stage", ["vqgan", "dit"])
def test_state_restores_exactly(stage, stage1_dir, stage2_dir):
    def make():
        if stage == "vqgan":
            return pipelines.vqgan_dataset(stage1_dir, batch_size=3, seed=2)
        return pipelines.dit_dataset(stage2_dir, batch_size=5, seed=2)

    it = iter(make())
    for _ in range(7):  # 21 samples: past the first stage-1 epoch of 16
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    fresh = iter(make())
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_make_global_batch_on_8_devices():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    host = {
        "latent": np.arange(16 * 4 * 4 * 2, dtype=np.float32).reshape(16, 4, 4, 2),
        "audio": np.arange(16 * W * D, dtype=np.float32).reshape(16, W, D),
    }
    batch = pipelines.make_global_batch(host, sharding)
    for key, value in host.items():
        assert batch[key].shape == value.shape and batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(batch[key]), value)
        shards = batch[key].addressable_shards
        assert len(shards) == 8 and all(s.data.shape[0] == 2 for s in shards)
        for s in shards:
            np.testing.assert_array_equal(np.asarray(s.data), value[s.index])


def test_bad_arguments(stage1_dir):
    with pytest.raises(ValueError, match="target"):
        pipelines.vqgan_dataset(stage1_dir, batch_size=2, target="mask")
    with pytest.raises(ValueError, match="host rows"):
        pipelines.vqgan_dataset(stage1_dir, batch_size=2, host_rows=(2, 4))
    with pytest.raises(ValueError, match="process index"):
        pipelines.default_host_rows(4, 2, 2)
    with pytest.raises(ValueError, match="does not split"):
        pipelines.default_host_rows(5, 0, 2)
    with pytest.raises(ValueError, match="no global batch"):
        pipelines.vqgan_dataset(stage1_dir, batch_size=64)


def test_worker_processes_match_and_resume(stage2_dir):
    """mp_prefetch (spawned workers) yields the in-process batches and resumes exactly."""

    def make(workers):
        return pipelines.dit_dataset(stage2_dir, batch_size=4, seed=4, worker_count=workers)

    want = take(make(0), 10)
    it = iter(make(2))
    try:
        got = [jax.tree.map(np.array, next(it)) for _ in range(6)]  # copy out of shared memory
        state = it.get_state()
    finally:
        it.close()
    it = iter(make(2))
    try:
        it.set_state(state)
        got += [jax.tree.map(np.array, next(it)) for _ in range(4)]
    finally:
        it.close()
    for x, y in zip(want, got, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_data_parallel_batches_pad_short_batches_to_a_power_of_two_only():
    """Results equal the unbatched function for any length; a short batch is padded to the
    next power of two (a multiple of the 8 devices), not to the full batch size."""
    import jax
    from flax import nnx

    from dithead_jax.data.latents import data_parallel_batches

    shapes = []

    def fn(model, x):
        shapes.append(x.shape[0])  # traced once per compiled shape
        return model(x)

    linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    apply = data_parallel_batches(linear, fn, batch_size=64)
    x = np.random.default_rng(0).normal(size=(70, 4)).astype(np.float32)
    for n in (3, 16, 70):
        np.testing.assert_allclose(apply(x[:n]), np.asarray(linear(x[:n])), rtol=1e-5, atol=1e-6)
    assert jax.local_device_count() == 8 and shapes == [8, 16, 64]  # 70 = 64 + 6 -> 8
