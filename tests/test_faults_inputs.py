"""Bad inputs a user really makes end in one line, not a traceback (issue 15, items 4-6, 8):
any file name, a silent video to dub, a dataset of the other stage, a config typo or an
impossible size, and one frame-timing rule for every reader (constant and variable rate)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from stage2_data import load_script

from dithead_jax import config as cfg
from dithead_jax.data import hdtf, records
from dithead_jax.data.video_io import (
    count_frames_at_fps,
    frame_schedule,
    iter_frames_at_fps,
    read_video,
    write_video,
)
from dithead_jax.synthetic.dataset import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stage2_data  # noqa: E402


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two synthetic talkers (0.8 s, 96 px, sidecar landmarks), no split list."""
    out = tmp_path_factory.mktemp("videos")
    syn = cfg.SyntheticConfig(identities=2, clips=1, seconds=0.8, size=96, seed=3)
    generate_dataset(syn, out)
    (out / "index.json").unlink()
    return out


# ---------------------------------------------------------------- names (item 4)


def test_any_file_name_is_preprocessed_and_keeps_its_name(videos, tmp_path, capsys):
    from dithead_jax.data.preprocess import safe_id

    src = tmp_path / "in"
    odd = src / "Zoë Smith"
    odd.mkdir(parents=True)
    for suffix in (".mp4", ".npz"):
        shutil.copy(videos / f"id000/clip000{suffix}", odd / f"clip 1{suffix}")
    # Sorts after the odd name: on HEAD the run died before ever writing it.
    shutil.copytree(videos / "id001", src / "zz_plain")
    preprocess = load_script("preprocess_cli", ROOT / "data/preprocess.py")
    args = ["--input", str(src), "--out", str(tmp_path / "out"), "--landmarks", "sidecar"]
    assert preprocess.main([*args, "--size", "32"]) == 0
    assert "2 videos written (40 frames)" in capsys.readouterr().out

    index = records.load_video_index(tmp_path / "out", "train")
    by_source = dict(zip(index["source"].tolist(), index["video_id"].tolist(), strict=True))
    assert set(by_source) == {"Zoë Smith/clip 1", "zz_plain/clip000"}
    assert by_source["zz_plain/clip000"] == "zz_plain+clip000"  # plain names are unchanged
    odd_id = by_source["Zoë Smith/clip 1"]
    assert records.valid_id(odd_id) and odd_id == safe_id("Zoë Smith/clip 1")
    assert odd_id.startswith("Zoe_Smith+clip_1-")
    assert "Zoë Smith" in index["identity"].tolist()
    sidecar = json.loads((tmp_path / "out/videos" / f"{odd_id}.json").read_text())
    assert sidecar["source"] == "Zoë Smith/clip 1" and sidecar["identity"] == "Zoë Smith"
    # Deterministic: a re-run finds both done.
    assert preprocess.main([*args, "--size", "32"]) == 0
    assert "2 already done" in capsys.readouterr().out
    # Names that slug alike stay apart.
    names = ["a b/c", "a_b/c", "a  b/c", "Zoe/x", "Zoë/x", "日本/語", "日本/话", "/"]
    assert len({safe_id(n) for n in names}) == len(names)
    assert all(records.valid_id(safe_id(n)) for n in names)


# ---------------------------------------------------------------- dubbing (item 5)


def test_a_silent_video_can_be_dubbed_and_audio_errors_name_the_audio(videos, tmp_path):
    from dithead_jax.config import DataConfig
    from dithead_jax.pipeline import prepare

    data = DataConfig(image_size=32, audio_dim=33)
    media = read_video(videos / "id000/clip000.mp4")
    video = tmp_path / "silent_video.mp4"
    write_video(video, media.frames, 25)  # no audio stream
    shutil.copy(videos / "id000/clip000.npz", video.with_suffix(".npz"))
    speech = videos / "id001/clip000.mp4"
    inputs = prepare(str(video), str(speech), "sidecar_or_dlib", {}, data)
    assert inputs["crops"]["frame"].shape == (20, 32, 32, 3)
    assert inputs["rate"] == 16_000 and abs(len(inputs["speech"]) - 0.8 * 16_000) < 400

    mute = tmp_path / "mute_audio.mp4"
    write_video(mute, media.frames[:4], 25)
    with pytest.raises(ValueError) as error:
        prepare(str(video), str(mute), "sidecar_or_dlib", {}, data)
    assert str(error.value) == f"{mute}: no audio stream"  # the audio file, not the video


# ---------------------------------------------------------- dataset kinds (item 6)


def test_a_dataset_of_the_other_stage_is_named_at_open_time(tmp_path):
    from dithead_jax.data import pipelines

    frames = np.zeros((4, 32, 32, 3), np.uint8)
    stage1 = stage2_data.write_stage1_clip(tmp_path / "s1", frames, frames[..., 0])
    stage2 = stage2_data.write_random_stage2(tmp_path / "s2", videos=1, frames=4)
    with pytest.raises(ValueError, match="stage-1 dataset.*the DiT needs a stage-2") as e:
        pipelines.dit_dataset(stage1, batch_size=2)
    assert "data/encode_latents.py" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="stage-2 dataset.*the VQGAN needs a stage-1") as e:
        pipelines.vqgan_dataset(stage2, batch_size=2)
    assert "\n" not in str(e.value)
    # The right kinds still open.
    next(iter(pipelines.dit_dataset(stage2, batch_size=2, min_reference_distance=1)))
    next(iter(pipelines.vqgan_dataset(stage1, batch_size=2)))


# ---------------------------------------------------------- config values (item 6)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: cfg.DiTConfig.testing(depth=0), "DiTConfig.depth must be > 0"),
        (lambda: cfg.DiTConfig.testing(num_heads=5), "DiTConfig.hidden_size must be a multiple"),
        (lambda: cfg.DiTConfig.testing(patch_size=3), "DiTConfig.patch_size must divide"),
        (lambda: cfg.DiTConfig.testing(hidden_size=0), "DiTConfig.hidden_size must be > 0"),
        (lambda: cfg.DiTConfig.testing(num_heads=0), "DiTConfig.num_heads must be > 0"),
        (lambda: cfg.VQGANConfig.testing(ch_mult=()), "VQGANConfig.ch_mult must be a non-empty"),
        (lambda: cfg.VQGANConfig.testing(codebook_size=0), "VQGANConfig.codebook_size must be"),
        (lambda: cfg.VQGANConfig.testing(ch=12), "VQGANConfig.norm_groups must divide"),
        (lambda: cfg.VQGANConfig.testing(resolution=30), "VQGANConfig.resolution must be a mul"),
        (lambda: cfg.TrainConfig(global_batch_size=0), "TrainConfig.global_batch_size must be"),
        (lambda: cfg.TrainConfig(global_batch_size=-4), "TrainConfig.global_batch_size must be"),
        (lambda: cfg.DataConfig(image_size=0), "DataConfig.image_size must be > 0"),
        (lambda: cfg.DiffusionConfig(num_timesteps=0), "DiffusionConfig.num_timesteps must be"),
        (lambda: cfg.VQGANLossConfig(disc_channels=0), "VQGANLossConfig.disc_channels must"),
    ],
)
def test_impossible_sizes_are_rejected_in_one_line(make, field):
    with pytest.raises(cfg.ConfigError) as e:
        make()
    assert str(e.value).startswith(field) and "(got " in str(e.value)
    assert "\n" not in str(e.value)


def test_every_preset_is_valid_and_errors_name_the_run_config_field():
    for name in ("S_2", "B_2", "L_2", "XL_2", "testing"):
        getattr(cfg.DiTConfig, name)()
    cfg.VQGANConfig.f4_16384(), cfg.VQGANConfig.f8_16384(), cfg.VQGANConfig.testing()
    cfg.TrainConfig(), cfg.DataConfig(), cfg.DiffusionConfig()
    with pytest.raises(ValueError, match=r"^config\.model\.depth must be > 0 \(got 0\)$"):
        cfg.from_dict(cfg.DiTConfig, {"depth": 0}, "config.model")


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "configs/dit.py:testing"]
    cmd += ["--workdir", str(tmp_path / "w"), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_train_py_turns_a_typo_and_depth_zero_into_one_line_exit_2(tmp_path):
    typo = _train(tmp_path, "--config.train.num_stpes=5")
    assert typo.returncode == 2 and typo.stdout == "", typo.stderr[-2000:]
    assert typo.stderr.strip() == (
        "train.py: error: --config.train.num_stpes: the config has no field 'num_stpes'; "
        "did you mean 'num_steps'?"
    )
    deep = _train(tmp_path, "--config.trian.num_steps=5")
    assert deep.returncode == 2 and "did you mean 'train'?" in deep.stderr
    assert len(deep.stderr.strip().splitlines()) == 1
    zero = _train(tmp_path, "--config.model.depth=0", "--config.data.dir=/nonexistent")
    assert zero.returncode == 2, zero.stderr[-2000:]
    lines = [line for line in zero.stderr.splitlines() if "train.py: error:" in line]
    assert lines == ["train.py: error: config.model.depth must be > 0 (got 0)"]
    assert "Traceback" not in zero.stderr


# ---------------------------------------------------------- frame timing (item 8)


def _index_frame(i: int, size: int = 32) -> np.ndarray:
    """Frame number i as 8 black/white stripes (bit b = stripe b): survives H.264."""
    bits = (i >> np.arange(8)) & 1
    row = np.repeat(bits * 255, size // 8).astype(np.uint8)
    return np.broadcast_to(row[None, :, None], (size, size, 3)).copy()


def _read_index(frame: np.ndarray) -> int:
    stripes = frame[4:-4].reshape(frame.shape[0] - 8, 8, -1, 3).mean(axis=(0, 2, 3))
    return int(sum(1 << b for b in range(8) if stripes[b] > 128))


def _write_vfr(path: Path, times_ms: list[int], end_ms: int, rate: int = 16_000) -> None:
    """H.264 frames shown at `times_ms` (each until the next; the last until `end_ms`) and
    a tone track as long: a variable-frame-rate phone video with known timestamps."""
    duration = dict(zip(times_ms, np.diff([*times_ms, end_ms]).tolist(), strict=True))
    with av.open(str(path), "w", format="mp4") as box:
        video = box.add_stream("libx264", rate=1000)
        video.width = video.height = 32
        video.pix_fmt, video.time_base = "yuv420p", Fraction(1, 1000)
        video.codec_context.time_base = Fraction(1, 1000)
        audio = box.add_stream("aac", rate=rate)
        audio.layout = "mono"
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(_index_frame(i), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in video.encode(frame):
                packet.duration = duration[packet.pts]  # the muxer's frame durations
                box.mux(packet)
        for packet in video.encode():
            packet.duration = duration[packet.pts]
            box.mux(packet)
        tone = (0.3 * np.sin(np.arange(end_ms * rate // 1000) / 5)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            piece = np.ascontiguousarray(tone[None, start : start + 1024])
            chunk = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
            chunk.sample_rate, chunk.pts = rate, start
            box.mux(audio.encode(chunk))
        box.mux(audio.encode())


def _expected(times_ms: list[int], end_ms: int, fps: int) -> list[int]:
    """The rule, written out: output k (at k / fps s) shows the latest frame at or before it,
    for every k / fps before the end."""
    count = -(-end_ms * fps // 1000)
    return [int(np.searchsorted(times_ms, k * 1000 // fps, side="right")) - 1 for k in range(count)]


def test_constant_rate_30_to_25_fps_takes_the_latest_frame_at_each_instant(tmp_path):
    path = tmp_path / "cfr30.mp4"
    write_video(path, np.stack([_index_frame(i) for i in range(45)]), 30)  # 1.5 s
    shown = [_read_index(f) for f in iter_frames_at_fps(path, 25)]
    assert shown == [k * 30 // 25 for k in range(38)]  # frame floor(1.2 k); 37.5 -> 38
    assert count_frames_at_fps(path, 25) == 38


def test_variable_rate_clip_is_the_same_frames_in_preprocessing_and_sample_py(tmp_path):
    # 3.00 s: 75 frames 30-50 ms apart; the last starts at 2.97 s and lasts 30 ms (on HEAD
    # the reader assumed one average interval, 40 ms, and made it 76 frames).
    steps = [50, 30] * 37
    steps[1] = 40
    times = np.concatenate([[0], np.cumsum(steps)]).tolist()
    assert len(times) == 75 and times[-1] == 2970
    raw = tmp_path / "phone.mp4"
    _write_vfr(raw, times, 3000)
    want = _expected(times, 3000, 25)
    assert len(want) == 75 and want != list(range(75))  # not a trivial 1:1 mapping
    assert frame_schedule(np.array(times) / 1000, 3.0, 25).tolist() == want

    # sample.py reads the raw video.
    shown = [_read_index(f) for f in iter_frames_at_fps(raw, 25)]
    assert shown == want
    assert count_frames_at_fps(raw, 25) == 75
    # data/hdtf cuts it (frames pass through with their times) and preprocessing reads it.
    clip = hdtf.HDTFClip(
        subset="RD", video="phone", index=0, identity="RD_phone", name="RD_phone_000",
        source=raw, time=hdtf.TimeRange(0.0, 3.0), crop=None, resolution=None,
        output=tmp_path / "clips/RD_phone/RD_phone_000.mp4",
    )  # fmt: skip
    result = hdtf.cut_clip(clip)
    assert result.status == "written" and result.duration == pytest.approx(3.0)
    cut = [_read_index(f) for f in iter_frames_at_fps(clip.output, 25)]
    assert cut == want
