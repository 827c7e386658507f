"""Dubbing streams: sample.py's video mode reads, crops, generates, pastes back and encodes
a chunk of frames at a time (pipeline.DiTHeadPipeline.dub), and its frames are the
in-memory path's, ping-pong and a ragged last chunk included; the streaming writer makes
a valid mp4 with its audio and leaves no file when it fails.

The model is an untrained tiny one (bench/sample_memory.py's, 32^2 crops): what is under
test is the plumbing, so frames must match exactly, not look good. Memory against video
length is bench/sample_memory.py's to measure (minutes, not a test).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from stage2_data import load_script, random_ifnet

from dithead_jax.data.video_io import (
    FrameSpool,
    VideoWriter,
    iter_frames_at_fps,
    probe_video,
    read_audio,
    read_video,
    write_video,
)
from dithead_jax.generation import pingpong_indices
from dithead_jax.sampling import FaceStream, InferenceOptions

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # crop size
FRAMES = 12  # source video frames (0.48 s)
SPEECH = 1.0  # seconds of speech: 25 output frames, ping-pong over the 12


@pytest.fixture(scope="module")
def bench():
    return load_script("sample_memory_bench", ROOT / "bench" / "sample_memory.py")


@pytest.fixture(scope="module")
def clip(bench, tmp_path_factory) -> dict:
    """A 64 px synthetic talker with its sidecar, a tiny pipeline and the speech."""
    from dithead_jax.pipeline import DiTHeadPipeline

    root = tmp_path_factory.mktemp("streaming")
    video = bench.write_talking_head(root / "talker.mp4", FRAMES / 25, 64, 64)
    rng = np.random.default_rng(0)
    speech = (0.3 * np.sin(np.arange(int(SPEECH * 16_000)) * 0.07)
              * rng.uniform(0.5, 1, int(SPEECH * 16_000))).astype(np.float32)  # fmt: skip
    pipe = DiTHeadPipeline(bench.tiny_models(SIZE))
    return dict(root=root, video=video, speech=speech, pipe=pipe, bench=bench)


KW = dict(steps=2, seed=3, landmarks="sidecar")


def assert_same_video(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal but for float reassociation: the VQGAN codec pads a chunk's batch to its own
    power of two (data.latents.data_parallel_batches), so a 7-frame chunk and the whole
    clip run D at different batch sizes, and a few pixels round the other way."""
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (diff.max(), np.mean(diff > 0))


@pytest.fixture(scope="module")
def whole(clip):
    """The in-memory result, the whole clip in one chunk, source | dubbed side by side."""
    return clip["pipe"](clip["video"], clip["speech"], side_by_side=True, chunk_frames=64, **KW)


def test_chunks_equal_the_whole_clip_through_ping_pong_and_a_ragged_last_chunk(clip, whole):
    assert len(whole.frames) == 25 and whole.frames.shape[1:] == (64, 128, 3)
    chunked = clip["pipe"](clip["video"], clip["speech"], side_by_side=True, chunk_frames=7,
                           **KW)  # fmt: skip
    assert_same_video(chunked.faces, whole.faces)
    assert_same_video(chunked.frames, whole.frames)
    np.testing.assert_array_equal(chunked.audio, whole.audio)
    # The left half is the source, in ping-pong order (0..11, 10..0, 1, 2).
    sources = np.stack(list(iter_frames_at_fps(clip["video"], 25)))
    np.testing.assert_array_equal(whole.frames[:, :, :64], sources[pingpong_indices(12, 25)])
    assert pingpong_indices(12, 25)[11:14].tolist() == [11, 10, 9]


@pytest.fixture(scope="module")
def interpolating(clip):
    """The fixture's pipeline with a (random, tiny) frame interpolator attached."""
    from dithead_jax.interpolation import Interpolator
    from dithead_jax.pipeline import DiTHeadPipeline

    models = clip["pipe"].models
    return DiTHeadPipeline(dataclasses.replace(models, interpolator=Interpolator(random_ifnet())))


@pytest.mark.parametrize("mode", ["smooth", "half_rate"])
def test_interpolated_chunks_equal_the_whole_clip(clip, interpolating, mode):
    """One frame is held back per chunk and given at the end: chunking changes nothing."""
    options = InferenceOptions(interpolate=mode)
    run = lambda n: interpolating(clip["video"], clip["speech"], side_by_side=True,
                                  chunk_frames=n, options=options, **KW)  # fmt: skip
    whole, chunked = run(64), run(7)
    assert len(whole.frames) == len(whole.faces) == 25
    assert_same_video(chunked.faces, whole.faces)
    assert_same_video(chunked.frames, whole.frames)


def test_half_rate_runs_the_dit_on_every_other_frame(clip, interpolating):
    models = interpolating.models
    rng = np.random.default_rng(0)
    masked = rng.integers(0, 256, (10, SIZE, SIZE, 3), np.uint8)
    audio = rng.standard_normal((10, 11, 33)).astype(np.float32)
    masks = np.full((10, SIZE, SIZE), 255, np.uint8)
    options = InferenceOptions(steps=2, interpolate="half_rate")
    stream = FaceStream(models, masked[0], options=options)
    faces = [stream(masked[:5], audio[:5], masks=masks[:5])]
    faces += [stream(masked[5:], audio[5:], masks=masks[5:]), stream.flush()]
    faces = np.concatenate(faces)
    assert len(faces) == 10 and stream.frames_done == 5  # frames 0, 2, 4, 6, 8


def test_double_writes_twice_the_frame_rate(clip, interpolating, whole, tmp_path):
    options = InferenceOptions(interpolate="double")
    doubled = interpolating(clip["video"], clip["speech"], side_by_side=True, chunk_frames=7,
                            options=options, **KW)  # fmt: skip
    assert doubled.fps == 50 and len(doubled.frames) == 2 * 25 - 1
    np.testing.assert_array_equal(doubled.frames[::2], whole.frames)
    out = tmp_path / "doubled.mp4"
    assert interpolating.dub(clip["video"], clip["speech"], out, options=options, **KW) == 49
    assert probe_video(out).fps == 50


def test_dub_streams_to_an_mp4_of_the_same_frames(clip, whole, tmp_path):
    out = tmp_path / "dubbed.mp4"
    spool = tmp_path / "spool"
    spool.mkdir()
    frames = clip["pipe"].dub(clip["video"], clip["speech"], out, side_by_side=True,
                              chunk_frames=7, spool_dir=spool, **KW)  # fmt: skip
    assert frames == 25 and not list(spool.iterdir())  # the spool is gone
    info = probe_video(out)
    assert (info.frames, info.height, info.width, info.has_audio) == (25, 64, 128, True)
    saved = read_video(out)
    assert len(saved.audio) == round(SPEECH * saved.sample_rate)
    # Lossy (an untrained model's faces are noise, H.264's worst case), so: near the
    # in-memory frames, and equal to them encoded whole by DubbedVideo.save (write_video).
    error = np.abs(saved.frames.astype(np.float32) - whole.frames).mean()
    assert error < 8, error
    whole.save(tmp_path / "saved.mp4")
    np.testing.assert_array_equal(read_video(tmp_path / "saved.mp4").frames, saved.frames)


def test_a_failure_mid_stream_leaves_no_file(clip, tmp_path, monkeypatch):
    from dithead_jax import sampling

    calls = []

    class Failing(sampling.FaceStream):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("device lost")
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(sampling, "FaceStream", Failing)
    out = tmp_path / "out" / "dubbed.mp4"
    with pytest.raises(RuntimeError, match="device lost"):
        clip["pipe"].dub(clip["video"], clip["speech"], out, chunk_frames=7, **KW)
    assert not list(out.parent.iterdir())
    # Bad input: one line naming the file, nothing written.
    with pytest.raises(FileNotFoundError, match="nothing.mp4: not found"):
        clip["pipe"].dub(tmp_path / "nothing.mp4", clip["speech"], out, **KW)
    assert not list(out.parent.iterdir())


def test_sample_py_video_mode_streams_with_a_progress_bar(clip, tmp_path, capsys, monkeypatch):
    from dithead_jax import sampling
    from dithead_jax.commands import sample

    # The loaded run is the fixture's, compiled already (test_export covers loading one).
    monkeypatch.setattr(sampling, "load_models", lambda path: clip["pipe"].models)
    model = tmp_path / "model"
    out = tmp_path / "dub.mp4"
    assert sample.main(["--model", str(model), "--video", str(clip["video"]), "--audio",
                        str(clip["video"]), "--out", str(out), "--steps", "2",
                        "--landmarks", "sidecar", "--chunk-frames", "5"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert f"wrote {out}: {FRAMES} frames" in captured.out
    assert "frame/s" in captured.err and f"{FRAMES}/{FRAMES}" in captured.err
    assert probe_video(out).frames == FRAMES
    with pytest.raises(SystemExit):
        sample.main(["--model", str(model), "--video", str(clip["video"]), "--audio",
                     str(clip["video"]), "--out", str(out), "--chunk-frames", "0"])  # fmt: skip
    assert "--chunk-frames must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- I/O pieces


def test_video_writer_encodes_as_frames_come_and_muxes_the_audio(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (30, 48, 64, 3), dtype=np.uint8)
    audio = (0.4 * np.sin(np.arange(20_000) * 0.05)).astype(np.float32)  # 1.25 s for 1.2 s
    with VideoWriter(tmp_path / "streamed.mp4", 25, audio, 16_000) as writer:
        for start in range(0, 30, 7):
            writer.write(frames[start : start + 7])
        writer.write(np.zeros((0, 48, 64, 3), np.uint8))  # an empty chunk is fine
    assert writer.frames == 30
    write_video(tmp_path / "whole.mp4", frames, 25, audio, 16_000)
    info = probe_video(tmp_path / "streamed.mp4")
    assert (info.frames, info.height, info.width, info.has_audio) == (30, 48, 64, True)
    streamed, whole = read_video(tmp_path / "streamed.mp4"), read_video(tmp_path / "whole.mp4")
    np.testing.assert_array_equal(streamed.frames, whole.frames)
    np.testing.assert_array_equal(streamed.audio, whole.audio)
    samples, rate = read_audio(tmp_path / "streamed.mp4")
    assert len(samples) == 30 * rate // 25  # trimmed to the video's 1.2 s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.mp4", "whole.mp4"]


def test_video_writer_leaves_nothing_on_error(tmp_path):
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(RuntimeError, match="stop"), VideoWriter(tmp_path / "a.mp4", 25) as w:
        w.write(frames)
        raise RuntimeError("stop")
    with pytest.raises(ValueError, match="even frame sizes"), VideoWriter(tmp_path / "b", 25) as w:
        w.write(np.zeros((2, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="16x16 after 32x32"), VideoWriter(tmp_path / "c", 25) as w:
        w.write(frames)
        w.write(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames to write"), VideoWriter(tmp_path / "d.mp4", 25):
        pass
    assert not list(tmp_path.iterdir())


def test_frame_spool_reads_frames_back_by_index(tmp_path):
    frames = np.random.default_rng(2).integers(0, 256, (9, 5, 7, 3), dtype=np.uint8)
    with FrameSpool(tmp_path) as spool:
        for frame in frames:
            spool.append(frame)
        assert len(spool) == 9 and not list(tmp_path.iterdir())  # an unnamed file
        for i in (8, 0, 3, -1):
            np.testing.assert_array_equal(spool[i], frames[i])
        with pytest.raises(IndexError):
            spool[9]
        with pytest.raises(ValueError, match="must all be"):
            spool.append(frames[0, :4])
