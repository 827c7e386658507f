"""data/preprocess.py end to end: synthetic videos -> TFDS ArrayRecord dataset; bad inputs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dithead_jax.config import DataConfig, SyntheticConfig
from dithead_jax.data import audio_features as af
from dithead_jax.data.faces import crop_to_source
from dithead_jax.data.video_io import read_audio, write_video
from dithead_jax.synthetic.dataset import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
SYN = SyntheticConfig(identities=3, clips=1, seconds=1.6, size=128, seed=2, test_fraction=0.3)


def run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "data/preprocess.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    generate_dataset(SYN, out)
    return out


@pytest.fixture(scope="module")
def dataset(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    result = run(
        "--input", str(videos), "--out", str(out), "--landmarks", "sidecar", "--size", "96"
    )
    assert result.returncode == 0, result.stderr
    assert "3 videos written (120 frames)" in result.stdout
    return out


def records(dataset: Path, split: str) -> list[dict]:
    builder = tfds.builder_from_directory(str(dataset / "dataset"))
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_records_hold_crops_masks_landmarks_and_aligned_audio(videos, dataset):
    train, test = records(dataset, "train"), records(dataset, "test")
    assert len(train) == 80 and len(test) == 40
    assert {r["identity"] for r in test} == {b"id002"}
    assert {r["identity"] for r in train} == {b"id000", b"id001"}
    r = train[10]
    assert r["frame"].shape == (96, 96, 3) and r["masked_frame"].shape == (96, 96, 3)
    assert r["mask"].shape == (96, 96) and r["audio"].shape == (11, 33)
    video = r["video_id"].decode()
    meta = np.load(videos / (video.replace("+", "/") + ".npz"))
    # Landmarks map back through the crop box onto the sidecar's source-pixel landmarks.
    t = int(r["frame_index"])
    source_points = crop_to_source(r["landmarks"], r["crop_box"], 96)
    np.testing.assert_allclose(source_points, meta["landmarks"][t], atol=1e-3)
    assert tuple(r["source_size"]) == (128, 128)
    # The mask hides the mouth (all lip landmarks) and the masked frame is filled there.
    lips = np.round(r["landmarks"][48:68]).astype(int)
    assert np.all(r["mask"][lips[:, 1], lips[:, 0]] == 255)
    assert np.abs(r["masked_frame"][lips[:, 1], lips[:, 0]].astype(int)).max() <= 8  # JPEG
    # Audio windows: the log-mel of the mp4's own audio, frame t in the middle of its window.
    audio, sr = read_audio(videos / (video.replace("+", "/") + ".mp4"), 16_000)
    per_frame = af.logmel_features(af.peak_normalize(audio[: 40 * 640]), sr, 40)
    np.testing.assert_allclose(r["audio"][5], per_frame[t], atol=1e-4)


def test_rerun_skips_finished_videos(videos, dataset):
    result = run(
        "--input", str(videos), "--out", str(dataset), "--landmarks", "sidecar", "--size", "96"
    )
    assert result.returncode == 0 and "0 videos written (0 frames), 3 already done" in result.stdout


def test_a_folder_of_bad_videos_gets_a_clean_summary(videos, tmp_path):
    bad = tmp_path / "bad"
    (bad / "person").mkdir(parents=True)
    good = videos / "id000/clip000.mp4"
    data = good.read_bytes()
    (bad / "person/truncated.mp4").write_bytes(data[: len(data) // 3])
    (bad / "person/garbage.mp4").write_bytes(b"not a video at all")
    frames = np.full((20, 64, 64, 3), 120, np.uint8)
    write_video(bad / "person/silent.mp4", frames, 25)  # no audio stream
    write_video(bad / "person/short.mp4", frames[:6], 25, np.zeros(6 * 640), 16_000)
    np.savez(bad / "person/short.npz", landmarks=np.zeros((6, 68, 2), np.float32))
    write_video(bad / "person/faceless.mp4", frames, 25, np.zeros(20 * 640), 16_000)
    np.savez(bad / "person/faceless.npz", landmarks=np.full((20, 68, 2), np.nan, np.float32))
    out = tmp_path / "out"
    result = run("--input", str(bad), "--out", str(out), "--landmarks", "sidecar", "--size", "64")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = {
        line.split(":")[0].split("/")[-1]: line
        for line in result.stdout.splitlines()
        if "skipped " in line
    }
    assert set(lines) == {"truncated.mp4", "garbage.mp4", "silent.mp4", "short.mp4", "faceless.mp4"}
    assert "no audio stream" in lines["silent.mp4"]
    assert "< 11" in lines["short.mp4"]
    assert "no face in any frame" in lines["faceless.mp4"]
    assert "no usable video" in result.stderr
    assert not (out / "dataset").exists()
    assert not [p for p in (out / "videos").iterdir()], "nothing partial may be left"
    # With one good video among them the run succeeds and lists the rest.
    shutil.copy(good, bad / "person/good.mp4")
    shutil.copy(good.with_suffix(".npz"), bad / "person/good.npz")
    result = run("--input", str(bad), "--out", str(out), "--landmarks", "sidecar", "--size", "64")
    assert result.returncode == 0 and "1 videos written" in result.stdout


def test_missing_faces_split_the_video_or_reject_it(videos, tmp_path):
    src = tmp_path / "in/person"
    src.mkdir(parents=True)
    shutil.copy(videos / "id001/clip000.mp4", src / "clip.mp4")
    meta = dict(np.load(videos / "id001/clip000.npz"))
    meta["landmarks"][15:18] = np.nan  # 40 frames: faces in 0-14 and 18-39
    np.savez(src / "clip.npz", **meta)
    (tmp_path / "none.txt").write_text("# nobody is held out\n")
    common = ["--input", str(tmp_path / "in"), "--landmarks", "sidecar", "--size", "64"]
    result = run(
        *common, "--out", str(tmp_path / "a"), "--test-identities", str(tmp_path / "none.txt")
    )
    assert result.returncode == 0, result.stderr
    index = np.load(tmp_path / "a/dataset/video_index-train.npz")
    assert list(index["video_id"]) == ["person+clip", "person+clip.s1"]
    assert list(index["length"]) == [15, 22]
    result = run(*common, "--out", str(tmp_path / "b"), "--missing-face", "drop_video")
    assert result.returncode == 1 and "no face in 3 of 40 frames" in result.stdout


def test_host_shards_then_finalize_cover_every_video(videos, tmp_path):
    out = str(tmp_path / "sharded")
    common = ["--input", str(videos), "--out", out, "--landmarks", "sidecar", "--size", "64"]
    for index in ("0", "1"):
        result = run(*common, "--num-shards", "2", "--shard-index", index)
        assert result.returncode == 0 and "run --finalize-only" in result.stdout
    assert not (tmp_path / "sharded/dataset").exists()
    assert run(*common, "--finalize-only").returncode == 0
    metadata = json.loads((tmp_path / "sharded/dataset/dataset_info.json").read_text())
    lengths = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in metadata["splits"]}
    assert lengths == {"train": 80, "test": 40}


def test_dlib_landmarks_find_the_synthetic_faces(tmp_path):
    """A real detector on our renders: HOG + the 68-point predictor, no sidecar."""
    big = SyntheticConfig(identities=1, clips=1, seconds=1.6, size=256, seed=4)
    generate_dataset(big, tmp_path / "in")
    (tmp_path / "in/id000/clip000.npz").rename(tmp_path / "truth.npz")
    out = tmp_path / "out"
    result = run(
        "--input", str(tmp_path / "in"), "--out", str(out), "--landmarks", "dlib", "--size", "64"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    truth = np.load(tmp_path / "truth.npz")["landmarks"]
    found = records(out, "train")
    assert len(found) == 40
    for r in found[::8]:
        points = crop_to_source(r["landmarks"], r["crop_box"], 64)
        face = np.ptp(truth[r["frame_index"], :, 0])
        assert np.abs(points - truth[r["frame_index"]]).mean() < 0.05 * face


def test_bad_arguments_are_one_line_errors(tmp_path):
    result = run("--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "input folder not found" in result.stderr
    result = run("--input", str(tmp_path), "--out", str(tmp_path / "o"), "--audio-features", "mfcc")
    assert result.returncode == 2 and "--audio-features must be" in result.stderr
    assert DataConfig().audio_features == 363


def test_each_video_keeps_its_speech_and_source_path(videos, dataset):
    """data/sources.py: the stored speech is the video's own sound resampled to 16 kHz (as
    int16, exactly), its path leads back to the video, the metadata says so, and the frames
    read back from it crop to the records (up to JPEG)."""
    from dithead_jax.data.faces import crop_face
    from dithead_jax.data.preprocess import safe_id
    from dithead_jax.data.records import dataset_metadata, load_video_index
    from dithead_jax.data.sources import (
        SPEECH_LAYOUT,
        frames_at,
        load_source,
        speech_under,
        to_pcm16,
    )

    layout = dataset_metadata(dataset)["provenance"]["speech"]
    assert layout == SPEECH_LAYOUT
    index = load_video_index(dataset, "test")
    source_id, first = safe_id(str(index["source"][0])), int(index["start"][0])
    source = load_source(dataset / "dataset", source_id, layout)  # either folder works
    mp4 = videos / (str(index["source"][0]) + ".mp4")
    assert source.video is not None and source.video.samefile(mp4)
    audio, rate = read_audio(mp4, 16_000)
    assert rate == 16_000 and source.speech.dtype == np.int16
    assert len(source.speech) == 40 * 640
    np.testing.assert_array_equal(source.speech, to_pcm16(audio[: 40 * 640]))
    # A clip's speech: from its first frame on; int16 -> float and back is exact.
    part = speech_under(source.speech, 10, 5)
    np.testing.assert_array_equal(to_pcm16(part), source.speech[10 * 640 : 15 * 640])
    # The source frames, cropped with the records' boxes, are the records' crops.
    test = records(dataset, "test")[first : first + 3]
    frames = list(frames_at(source.video, [int(r["frame_index"]) for r in test]))
    for frame, r in zip(frames, test, strict=True):
        crop = crop_face(frame, r["crop_box"], 96).astype(int)
        assert np.abs(crop - r["frame"]).mean() < 2  # JPEG q95
    # A dataset made before stage 1 kept speech: nothing found, and why.
    old = load_source(dataset, source_id, None)
    assert old.speech is None and "keeps no speech" in old.speech_missing
