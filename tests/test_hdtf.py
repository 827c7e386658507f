"""HDTF preparation: annotation parsing in the published format, planning, cutting, the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dithead_jax.data.hdtf import (
    AnnotationError,
    CropBox,
    TimeRange,
    cut_clip,
    fit_crop,
    parse_time_range,
    plan_clips,
    prepare_clips,
    read_annotation_times,
    read_crops,
    read_identity_list,
    read_resolutions,
    read_video_urls,
)
from dithead_jax.data.video_io import iter_frames_at_fps, read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "data/hdtf/prepare.py"
RAW_FPS, RAW_SECONDS, RATE = 30, 3, 16_000
LEVELS = (40, 120, 200)  # grey of the left part during seconds 0, 1, 2 of the raw video

# The layout of HDTF_dataset/ in the GitHub repository MRzzm/HDTF, with made-up names and ids but
# its real quirks: a BOM, a trailing space, no final newline, "&t=" suffixes, one upload listed
# twice, a resolution of 0, a subset without a crop file.
ANNOTATIONS = {
    "WDA_video_url.txt": "\ufeffJaneDoe0 https://www.youtube.com/watch?v=AAAAAAAAAAA\n"
    "JaneDoe1 https://www.youtube.com/watch?v=BBBBBBBBBBB&t=6s\n"
    "JaneRoe https://www.youtube.com/watch?v=AAAAAAAAAAA&t=3s",
    "WDA_annotion_time.txt": "JaneDoe0.mp4 00:00-00:01 00:01-00:03 \n"
    "JaneDoe1.mp4 00:05-01:20\nJaneRoe.mp4 00:02-00:10",
    "WDA_crop_wh.txt": "JaneDoe0_0.mp4 8 32 16 32\nJaneDoe0_1.mp4 8 32 16 32\n"
    "JaneDoe1_0.mp4 100 300 0 300\n",
    "WDA_resolution.txt": "JaneDoe0.mp4 64\nJaneDoe1.mp4 720\nJaneRoe.mp4 0\n",
    "RD_video_url.txt": "Radio7 https://www.youtube.com/watch?v=CCCCCCCCCCC\n",
    "RD_annotion_time.txt": "Radio7.mp4 00:01-00:02\n",
}


def _raw_video(path: Path, audio: bool = True) -> None:
    """96x64, 30 fps, 3 s: the left 64 columns change grey each second, the rest is blue."""
    frames = np.zeros((RAW_FPS * RAW_SECONDS, 64, 96, 3), np.uint8)
    frames[..., 64:, 2] = 255
    for i in range(len(frames)):
        frames[i, :, :64] = LEVELS[i // RAW_FPS]
    t = np.arange(RAW_SECONDS * RATE) / RATE
    sound = 0.3 * np.sin(2 * np.pi * 440 * t) if audio else None
    write_video(path, frames, RAW_FPS, sound, RATE)


@pytest.fixture(scope="module")
def hdtf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdtf")
    (root / "ann").mkdir()
    for name, text in ANNOTATIONS.items():
        (root / "ann" / name).write_text(text, encoding="utf-8")
    _raw_video(root / "raw/WDA/JaneDoe0.mp4")
    _raw_video(root / "raw/RD_Radio7.mp4")
    return root


@pytest.fixture(scope="module")
def prepared(hdtf):
    clips = plan_clips(hdtf / "ann", hdtf / "raw", hdtf / "out")
    return clips, prepare_clips(clips, workers=2, progress=False)


def test_readers_parse_the_published_line_formats(hdtf):
    ann = hdtf / "ann"
    urls = read_video_urls(ann / "WDA_video_url.txt")
    assert list(urls) == ["JaneDoe0", "JaneDoe1", "JaneRoe"]  # BOM gone
    assert urls["JaneDoe1"].endswith("&t=6s")
    times = read_annotation_times(ann / "WDA_annotion_time.txt")
    assert times["JaneDoe0"] == [TimeRange(0, 1), TimeRange(1, 3)]
    assert times["JaneDoe1"] == [TimeRange(5, 80)]
    assert read_crops(ann / "WDA_crop_wh.txt")[("JaneDoe1", 0)] == CropBox(100, 0, 300, 300)
    assert read_resolutions(ann / "WDA_resolution.txt") == {
        "JaneDoe0": 64,
        "JaneDoe1": 720,
        "JaneRoe": 0,
    }
    assert parse_time_range("1:02:03-1:02:04.5") == TimeRange(3723, 3724.5)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("WDA_annotion_time.txt", "A.mp4 00:10-00:20\nB.mp4 00:20-00:10\n", ":2: range ends"),
        ("WDA_annotion_time.txt", "A.mp4 00:10\n", ":1: not a START-END range"),
        ("WDA_annotion_time.txt", "A.mp4 0010-0020\n", ":1: not a timestamp"),
        ("WDA_annotion_time.txt", "A.mp4 00:1x-00:20\n", ":1: not a timestamp"),
        ("WDA_annotion_time.txt", "A.mp4\n", ":1: expected '<video>.mp4 MM:SS-MM:SS"),
        ("WDA_annotion_time.txt", "A.mp4 00:01-00:02\nA.mp4 00:03-00:04", ":2: A listed twice"),
        ("WDA_crop_wh.txt", "A_0.mp4 1 2 3\n", ":1: expected '<video>_<index>.mp4 x width"),
        ("WDA_crop_wh.txt", "A.mp4 1 2 3 4\n", ":1: expected '<video>_<index>.mp4 x width"),
        ("WDA_resolution.txt", "A.mp4 720p\n", ":1: expected '<video>.mp4 <frame height>'"),
        ("WDA_video_url.txt", "\n\nA www.example\n", ":3: expected '<video> <url>'"),
    ],
)
def test_malformed_line_is_one_error_naming_file_and_line(tmp_path, name, text, message):
    if name != "WDA_annotion_time.txt":
        (tmp_path / "WDA_annotion_time.txt").write_text("A.mp4 00:01-00:02\n")
    (tmp_path / name).write_text(text)
    with pytest.raises(AnnotationError) as info:
        plan_clips(tmp_path, tmp_path / "raw", tmp_path / "out")
    assert str(info.value).startswith(str(tmp_path / name) + message)
    assert "\n" not in str(info.value)


def test_plan_names_identities_sources_and_outputs(hdtf):
    clips = {c.name: c for c in plan_clips(hdtf / "ann", hdtf / "raw", hdtf / "out")}
    assert sorted(clips) == [
        "RD_Radio7_000",
        "WDA_JaneDoe0_000",
        "WDA_JaneDoe0_001",
        "WDA_JaneDoe1_000",
        "WDA_JaneRoe_000",
    ]
    doe = clips["WDA_JaneDoe0_001"]
    assert (doe.identity, doe.video, doe.index) == ("WDA_JaneDoe", "JaneDoe0", 1)
    assert doe.source == hdtf / "raw/WDA/JaneDoe0.mp4" and doe.time == TimeRange(1, 3)
    assert doe.crop == CropBox(8, 16, 32, 32) and doe.resolution == 64
    assert doe.output == hdtf / "out/WDA_JaneDoe/WDA_JaneDoe0_001.mp4"
    assert clips["WDA_JaneDoe1_000"].identity == "WDA_JaneDoe"  # counter dropped
    assert clips["WDA_JaneRoe_000"].identity == "WDA_JaneDoe"  # same upload as JaneDoe0
    assert clips["WDA_JaneRoe_000"].resolution is None and clips["WDA_JaneRoe_000"].source is None
    radio = clips["RD_Radio7_000"]
    assert radio.identity == "RD_Radio7" and radio.crop is None
    assert radio.source == hdtf / "raw/RD_Radio7.mp4"
    cropped = plan_clips(hdtf / "ann", hdtf / "raw", hdtf / "out", require_crop=True)
    assert "RD_Radio7_000" not in {c.name for c in cropped}
    only = plan_clips(hdtf / "ann", hdtf / "raw", hdtf / "out", identities=["RD_Radio7"])
    assert [c.name for c in only] == ["RD_Radio7_000"]
    with pytest.raises(ValueError, match="not in the HDTF annotations: WDA_Nobody"):
        plan_clips(hdtf / "ann", hdtf / "raw", hdtf / "out", identities=["WDA_Nobody"])


def test_fit_crop_rescales_only_plausible_resolutions_and_stays_inside():
    # Same height as annotated: only the odd size rounds down to even.
    box = fit_crop(CropBox(466, 0, 535, 535), 1280, 720, 720)
    assert (box.width, box.height) == (534, 534) and 466 <= box.x <= 467 and box.y == 0
    # Downloaded at 1080p, measured at 720p: scaled by 1.5.
    assert fit_crop(CropBox(466, 10, 532, 532), 1920, 1080, 720) == CropBox(699, 15, 798, 798)
    # A 1134 px box cannot come from a 720p frame: not rescaled, shrunk about its centre.
    assert fit_crop(CropBox(83, 0, 1134, 1134), 1920, 1080, 720) == CropBox(110, 0, 1080, 1080)
    # Resolution unknown (listed as 0): used as is; an overhang slides back inside.
    assert fit_crop(CropBox(1700, 900, 400, 400), 1920, 1080, None) == CropBox(1520, 680, 400, 400)


def test_cut_clips_have_the_range_crop_25fps_and_audio(prepared, hdtf):
    _, summary = prepared
    assert summary.written == ["RD_Radio7_000", "WDA_JaneDoe0_000", "WDA_JaneDoe0_001"]
    assert summary.failed == {} and summary.short == [] and summary.skipped == []
    expected = {  # name: (seconds, per-frame grey levels, frame size)
        "WDA_JaneDoe/WDA_JaneDoe0_000": (1, [40] * 25, (32, 32)),
        "WDA_JaneDoe/WDA_JaneDoe0_001": (2, [120] * 25 + [200] * 25, (32, 32)),
        "RD_Radio7/RD_Radio7_000": (1, [120] * 25, (64, 96)),
    }
    for name, (seconds, levels, size) in expected.items():
        media = read_video(hdtf / "out" / f"{name}.mp4")
        # The clip keeps the source's timing; at 25 fps it is what preprocessing reads.
        frames = np.stack(list(iter_frames_at_fps(hdtf / "out" / f"{name}.mp4", 25)))
        assert frames.shape[1:3] == size
        assert abs(len(frames) - 25 * seconds) <= 1, name
        grey = frames[:, 4:-4, 4 : min(60, size[1] - 4)].mean(axis=(1, 2, 3))
        for i, (got, want) in enumerate(zip(grey, levels, strict=False)):
            if i not in (24, 25):  # a frame on the second boundary may come from either side
                assert abs(got - want) < 12, (name, i, got, want)
        if size == (32, 32):  # cropped to the grey part: no blue left
            assert (frames[..., 2].astype(int) - frames[..., 0]).max() < 20
        assert media.audio is not None and media.sample_rate == RATE
        assert abs(len(media.audio) / RATE - seconds) < 0.1, name
        assert np.abs(media.audio).max() > 0.1  # the tone survived
    assert not list((hdtf / "out").rglob(".*")), "temporary files left behind"


def test_missing_raw_videos_are_summarised(prepared):
    _, summary = prepared
    assert summary.missing_raw == ["WDA/JaneDoe1", "WDA/JaneRoe"]
    assert summary.missing_clips == 2 and summary.available == 3


def test_rerun_skips_finished_clips_and_redoes_missing_ones(prepared, hdtf):
    clips, _ = prepared
    kept = hdtf / "out/WDA_JaneDoe/WDA_JaneDoe0_000.mp4"
    removed = hdtf / "out/RD_Radio7/RD_Radio7_000.mp4"
    stamp = kept.stat().st_mtime_ns
    removed.unlink()
    summary = prepare_clips(clips, progress=False)
    assert summary.written == ["RD_Radio7_000"] and removed.is_file()
    assert summary.skipped == ["WDA_JaneDoe0_000", "WDA_JaneDoe0_001"]
    assert kept.stat().st_mtime_ns == stamp
    assert cut_clip(clips[1]).status == "skipped"


def test_raw_video_without_audio_fails_that_clip_only(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann/RD_annotion_time.txt").write_text("Radio1.mp4 00:00-00:01\n")
    _raw_video(tmp_path / "raw/RD/Radio1.mp4", audio=False)
    clips = plan_clips(tmp_path / "ann", tmp_path / "raw", tmp_path / "out")
    summary = prepare_clips(clips, progress=False)
    assert list(summary.failed) == ["RD_Radio1_000"]
    assert "no audio track" in summary.failed["RD_Radio1_000"]
    assert summary.available == 0 and not list((tmp_path / "out").rglob("*.mp4"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(PREPARE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_exit_codes_and_summary(hdtf, tmp_path):
    ann, out = str(hdtf / "ann"), str(tmp_path / "out")
    nothing = _cli("--annotations", ann, "--raw", str(tmp_path / "empty"), "--out", out)
    assert nothing.returncode == 1 and "no clip produced" in nothing.stderr
    assert "missing raw videos (4)" in nothing.stdout
    assert "RD/Radio7 WDA/JaneDoe0 WDA/JaneDoe1 WDA/JaneRoe" in nothing.stdout

    wanted = tmp_path / "ids.txt"
    wanted.write_text("# just the radio host\nRD_Radio7\n")
    args = ["--annotations", ann, "--raw", str(hdtf / "raw"), "--out", out, "--identities"]
    first = _cli(*args, str(wanted), "--workers", "1")
    assert first.returncode == 0, first.stderr
    assert "1 clips planned: 1 written, 0 already done" in first.stdout
    assert (tmp_path / "out/RD_Radio7/RD_Radio7_000.mp4").is_file()
    again = _cli(*args, str(wanted))
    assert again.returncode == 0 and "0 written, 1 already done" in again.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--identities", "IDS"], "identities not in the HDTF annotations: WDA_Nobody"),
        (["--annotations", "BAD"], "BAD/WDA_annotion_time.txt:1: not a timestamp"),
    ],
)
def test_cli_rejects_bad_input_in_one_line(hdtf, tmp_path, extra, message):
    (tmp_path / "IDS").write_text("WDA_Nobody\n")
    (tmp_path / "BAD").mkdir()
    (tmp_path / "BAD/WDA_annotion_time.txt").write_text("X.mp4 00:aa-00:10\n")
    args = ["--annotations", str(hdtf / "ann"), "--raw", str(hdtf / "raw"), "--out", "OUT"]
    args += extra
    result = subprocess.run(
        [sys.executable, str(PREPARE), *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not (tmp_path / "OUT").exists()


def test_test_identity_list_is_well_formed():
    names = read_identity_list(ROOT / "data/hdtf/test_identities.txt")
    assert len(names) == len(set(names)) == 11  # DiT-Head's paper: 11 unseen identities
    assert {n.split("_", 1)[0] for n in names} == {"RD", "WDA", "WRA"}
    for name in names:
        subset, person = name.split("_", 1)
        assert person.isalnum() and (subset == "RD" or not person[-1].isdigit()), name
