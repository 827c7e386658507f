"""Record format: write per-video shards, finalize to a TFDS dir, read back without TF."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dithead_jax.data import records

S, W, D = 32, 11, 5


def stage1_video(t: int, seed: int, smooth: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if smooth:
        # JPEG is judged on image-like content, not on noise.
        y, x = np.mgrid[0:S, 0:S] / S
        phase = rng.uniform(0, 6, size=(t, 1, 1, 3))
        frame = 127.5 + 100 * np.sin(2 * x[None, ..., None] + 3 * y[None, ..., None] + phase)
        frame = frame.astype(np.uint8)
    else:
        frame = rng.integers(0, 256, (t, S, S, 3), dtype=np.uint8)
    return {
        "frame": frame,
        "masked_frame": rng.integers(0, 256, (t, S, S, 3), dtype=np.uint8),
        "mask": rng.integers(0, 256, (t, S, S), dtype=np.uint8),
        "landmarks": rng.uniform(0, S, (t, 68, 2)).astype(np.float32),
        "crop_box": rng.uniform(0, 500, (t, 4)).astype(np.float32),
        "source_size": np.tile(np.array([480, 640], np.int32), (t, 1)),
        "audio": rng.normal(size=(t, W, D)).astype(np.float32),
    }


def stage2_video(t: int, seed: int, k: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "latent": rng.normal(size=(t, 4, 4, 3)).astype(np.float16),
        "masked_latents": rng.normal(size=(t, k, 4, 4, 3)).astype(np.float16),
        "mask": rng.integers(0, 256, (t, 4, 4), dtype=np.uint8),
        "audio": rng.normal(size=(t, W, D)).astype(np.float32),
    }


def stage1_writer(path, encoding="png") -> records.DatasetWriter:
    return records.DatasetWriter(
        path, "stage1", image_size=S, audio_window=W, audio_dim=D, image_encoding=encoding
    )


def test_stage1_png_round_trip_without_tensorflow(tmp_path):
    w = stage1_writer(tmp_path)
    videos = {"a0": stage1_video(5, 0), "b0": stage1_video(3, 1)}
    w.write_video("train", "a0", videos["a0"], identity="alice")
    w.write_video("test", "b0", {**videos["b0"], "identity": "bob"})
    out = w.finalize()
    assert out == tmp_path / "dataset"

    builder = tfds.builder_from_directory(os.fspath(out))  # the plain TFDS loader
    assert builder.info.splits["train"].num_examples == 5
    assert builder.info.splits["test"].num_examples == 3
    assert builder.info.splits["train"].shard_lengths == [5]
    source, features = records.open_dataset(tmp_path, "train")
    assert set(features.keys()) >= {"frame", "masked_frame", "mask", "landmarks", "identity"}
    assert len(source) == 5
    for i in range(5):
        r = source[i]
        for key, value in videos["a0"].items():
            assert r[key].dtype == value.dtype, key
            np.testing.assert_array_equal(r[key], value[i], err_msg=key)
        assert r["identity"] == b"alice" and r["video_id"] == b"a0"
        assert r["frame_index"] == i and r["num_frames"] == 5
    test_source, _ = records.open_dataset(out, "test")
    assert test_source[2]["identity"] == b"bob"
    np.testing.assert_array_equal(test_source[2]["frame"], videos["b0"]["frame"][2])
    assert records.dataset_metadata(tmp_path)["image_encoding"] == "png"
    assert "tensorflow" not in sys.modules


def test_stage1_jpeg_within_tolerance_and_float_mask(tmp_path):
    w = stage1_writer(tmp_path, "jpeg")
    video = stage1_video(2, 3, smooth=True)
    alpha = np.linspace(0, 1, S * S).reshape(1, S, S).repeat(2, 0)
    w.write_video("train", "v", {**video, "mask": alpha}, identity="x")
    source, _ = records.open_dataset(w.finalize(), "train")
    r = source[1]
    err = np.abs(r["frame"].astype(np.int16) - video["frame"][1]).mean()
    assert err < 2.0, err  # q95 4:4:4
    np.testing.assert_array_equal(r["mask"], np.round(alpha[1] * 255).astype(np.uint8))


def test_stage2_round_trip_and_video_index(tmp_path):
    w = records.DatasetWriter(
        tmp_path, "stage2", latent_shape=(4, 4, 3), num_masked=2, audio_window=W, audio_dim=D
    )
    v0, v1 = stage2_video(4, 0), stage2_video(3, 1)
    # Frames where preprocessing found no face are absent: frame_index has gaps.
    w.write_video("train", "v1", {**v1, "frame_index": np.array([0, 5, 9])}, identity="q")
    # Encoders produce float32 latents; the writer stores the spec's float16.
    w.write_video("train", "v0", {**v0, "latent": v0["latent"].astype(np.float32)}, identity="p")
    source, features = records.open_dataset(w.finalize(), "train")
    assert features["latent"].np_dtype == np.float16
    # Shards are ordered by video_id, whatever order they were written in.
    index = records.load_video_index(tmp_path, "train")
    assert index["video_id"].tolist() == ["v0", "v1"]
    assert index["start"].tolist() == [0, 4] and index["length"].tolist() == [4, 3]
    assert index["frame_index"].tolist() == [0, 1, 2, 3, 0, 5, 9]
    r = source[5]
    assert r["video_id"] == b"v1" and r["frame_index"] == 5 and r["num_frames"] == 3
    np.testing.assert_array_equal(r["latent"], v1["latent"][1])
    np.testing.assert_array_equal(r["masked_latents"], v1["masked_latents"][1])
    np.testing.assert_array_equal(r["mask"], v1["mask"][1])
    np.testing.assert_array_equal(source[2]["audio"], v0["audio"][2])
    np.testing.assert_array_equal(source[2]["latent"], v0["latent"][2])


def test_resume_adds_videos_and_refinalizes(tmp_path):
    w = stage1_writer(tmp_path)
    w.write_video("train", "v0", stage1_video(2, 0), identity="a")
    w.finalize()
    first, _ = records.open_dataset(tmp_path, "train")
    assert len(first) == 2

    w2 = stage1_writer(tmp_path)  # a new job on the same directory
    assert w2.has_video("v0") and not w2.has_video("v1")
    w2.write_video("train", "v1", stage1_video(3, 1), identity="b")
    out = w2.finalize()
    source, _ = records.open_dataset(out, "train")
    assert len(source) == 5
    assert [source[i]["video_id"] for i in (0, 2)] == [b"v0", b"v1"]
    names = sorted(p.name for p in out.glob("*.array_record-*"))
    assert names == [
        "dithead_stage1-train.array_record-00000-of-00002",
        "dithead_stage1-train.array_record-00001-of-00002",
    ]
    # Hard links, not copies.
    assert (out / names[1]).stat().st_ino == (tmp_path / "videos/v1.array_record").stat().st_ino


def test_unfinished_shards_are_ignored(tmp_path):
    w = stage1_writer(tmp_path)
    w.write_video("train", "done", stage1_video(2, 0), identity="a")
    # A writer killed mid-shard leaves a dot-temp file; one killed between the shard rename
    # and its sidecar leaves a shard without a sidecar. Neither counts as finished.
    (tmp_path / "videos/.half.array_record.x1.tmp").write_bytes(b"partial")
    (tmp_path / "videos/orphan.array_record").write_bytes(b"no sidecar")
    assert not w.has_video("half") and not w.has_video("orphan")
    source, _ = records.open_dataset(w.finalize(), "train")
    assert len(source) == 2
    assert [v["video_id"] for v in w.finished_videos()] == ["done"]


def test_failed_video_leaves_nothing(tmp_path):
    w = stage1_writer(tmp_path)
    with pytest.raises(RuntimeError), w.video_writer("train", "v", identity="a", num_frames=4) as v:
        v.write(stage1_video(2, 0))
        raise RuntimeError("preprocessing crashed")
    assert not w.has_video("v")
    assert list((tmp_path / "videos").iterdir()) == []
    # Too few frames is refused at commit.
    with (
        pytest.raises(ValueError, match="wrote 2 of 3"),
        w.video_writer("train", "v", identity="a", num_frames=3) as v,
    ):
        v.write(stage1_video(2, 0))
    assert not w.has_video("v")


def test_streamed_video_equals_one_shot(tmp_path):
    video = stage1_video(5, 7)
    w = stage1_writer(tmp_path)
    with w.video_writer("train", "v", identity="a", num_frames=5) as v:
        v.write({k: x[:2] for k, x in video.items()})
        v.write({k: x[2:] for k, x in video.items()})
    source, _ = records.open_dataset(w.finalize(), "train")
    assert [source[i]["frame_index"] for i in range(5)] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(source[4]["frame"], video["frame"][4])


def test_writer_rejects_bad_input(tmp_path):
    w = stage1_writer(tmp_path)
    with pytest.raises(ValueError, match="writer was given"):
        stage1_writer(tmp_path, "jpeg")  # same directory, different format
    bad = stage1_video(3, 0)
    with pytest.raises(ValueError, match="disagree"):
        w.write_video("train", "v", {**bad, "audio": bad["audio"][:2]}, identity="a")
    with pytest.raises(ValueError, match="frame"):
        w.write_video("train", "v", {**bad, "frame": bad["frame"][:, :16]}, identity="a")
    with pytest.raises(ValueError, match="increasing"):
        w.write_video("train", "v", {**bad, "frame_index": np.array([0, 2, 1])}, identity="a")
    with pytest.raises(ValueError, match="video_id"):
        w.write_video("train", "../escape", bad, identity="a")
    with pytest.raises(ValueError, match="no finished videos"):
        w.finalize()
