"""The synthetic talking faces: file contract, landmarks vs pixels, audio -> mouth, determinism."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, signal
from skimage.draw import polygon2mask

from dithead_jax.config import SyntheticConfig
from dithead_jax.data.video_io import read_video
from dithead_jax.synthetic.dataset import generate_dataset, render_synthetic_clip
from dithead_jax.synthetic.render import Palette
from dithead_jax.synthetic.speech import PHONEMES, Viseme

ROOT = Path(__file__).resolve().parents[1]
CFG = SyntheticConfig(identities=3, clips=1, seconds=3.2, size=192, seed=7, test_fraction=0.34)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(CFG, out)
    return out


def test_cli_writes_the_documented_files(tmp_path):
    out = tmp_path / "set"
    cmd = [sys.executable, str(ROOT / "data/synthetic.py"), "--out", str(out), "--identities",
           "2", "--clips", "2", "--seconds", "0.6", "--seed", "3", "--size", "96"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "wrote 4 clips of 2 identities" in result.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["splits"] == {"train": ["id000"], "test": ["id001"]}
    assert len(index["clips"]) == 4
    for entry in index["clips"]:
        assert entry["split"] == index["identities"][entry["identity"]]["split"]
        assert (out / entry["video"]).is_file() and (out / entry["annotations"]).is_file()
        assert entry["num_frames"] == 15 and entry["duration"] == pytest.approx(0.6)
        meta = np.load(out / entry["annotations"])
        assert meta["landmarks"].shape == (15, 68, 2) and meta["landmarks"].dtype == np.float32
        assert meta["mouth_open"].shape == (15,) and meta["mouth_open"].dtype == np.float32
        assert meta["viseme"].shape == (15,) and np.issubdtype(meta["viseme"].dtype, np.integer)
        assert str(meta["identity"]) == entry["identity"]
    assert not list(out.rglob(".*")), "temporary files left behind"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--identities", "-1"], "--identities and --clips must be >= 1"),
        (["--clips", "0"], "--identities and --clips must be >= 1"),
        (["--seconds", "-2"], "--seconds must be > 0"),
        (["--size", "101"], "--size must be an even number"),
    ],
)
def test_cli_rejects_bad_arguments_in_one_line(tmp_path, args, message):
    cmd = [sys.executable, str(ROOT / "data/synthetic.py"), "--out", str(tmp_path / "o"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_rejects_unwritable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cmd = [sys.executable, str(ROOT / "data/synthetic.py"), "--out", str(blocker / "sub")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "cannot write to" in result.stderr


def test_mp4_decodes_back_to_the_rendered_frames_with_matching_audio(dataset):
    rendered, audio, _ = render_synthetic_clip(CFG, 0, 0)
    media = read_video(dataset / "id000/clip000.mp4")
    assert media.fps == 25 and media.frames.shape == rendered.frames.shape
    err = media.frames.astype(np.float64) - rendered.frames
    psnr = 10 * np.log10(255**2 / np.mean(err**2))
    assert psnr > 34, f"decoded video differs from the render: PSNR {psnr:.1f} dB"
    # Audio: at least 16 kHz, same duration as the video within one frame, same signal.
    assert media.sample_rate >= 16_000
    assert abs(len(media.audio) / media.sample_rate - len(media.frames) / media.fps) <= 1 / 25
    n = min(len(audio), len(media.audio))
    assert np.corrcoef(audio[:n], media.audio[:n])[0, 1] > 0.97


def _probe_masks(identity: int, *palette_fields: str):
    """Pixels of some features, found by re-rendering with them in a vivid colour."""
    normal, _, _ = render_synthetic_clip(CFG, identity, 0)
    probe = Palette(**{field: (0, 255, 0) for field in palette_fields})
    marked, _, _ = render_synthetic_clip(CFG, identity, 0, palette=probe)
    changed = np.abs(marked.frames.astype(int) - normal.frames).sum(-1) > 60
    return normal, changed


def _polygon(points: np.ndarray, size: int) -> np.ndarray:
    # polygon2mask takes (row, col) vertices; landmarks are (x, y) with pixel centres at integers.
    return polygon2mask((size, size), points[:, ::-1])


@pytest.mark.parametrize("identity", [0, 1, 2])
def test_mouth_interior_lies_inside_the_inner_lip_landmarks(identity):
    clip, interior = _probe_masks(identity, "mouth_interior", "teeth", "tongue")
    size, checked = CFG.size, 0
    for t in np.flatnonzero(clip.mouth_open > 0.05):
        inner = _polygon(clip.landmarks[t, 60:68], size)
        near_inner = ndimage.binary_dilation(inner, iterations=2)
        assert interior[t][near_inner].sum() / interior[t].sum() > 0.97, f"frame {t}"
        # The polygon's middle is mouth (interior, teeth or tongue), not skin or lips.
        assert interior[t][inner].sum() >= 0.3 * inner.sum()
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("identity", [0, 2])
def test_eye_whites_lie_inside_the_eye_landmarks(identity):
    clip, whites = _probe_masks(identity, "eye_white")
    size = CFG.size
    for t in np.flatnonzero(clip.eye_open > 0.9)[::5]:
        eyes = _polygon(clip.landmarks[t, 36:42], size) | _polygon(clip.landmarks[t, 42:48], size)
        assert whites[t].sum() > 10
        inside = whites[t][ndimage.binary_dilation(eyes, iterations=2)].sum()
        assert inside / whites[t].sum() > 0.97, f"frame {t}"


def test_mouth_opening_follows_the_viseme_and_matches_the_landmarks(dataset):
    meta = [np.load(dataset / f"id00{i}/clip000.npz") for i in range(3)]
    opening = np.concatenate([m["mouth_open"] for m in meta])
    viseme = np.concatenate([m["viseme"] for m in meta])
    per_viseme = {v: opening[viseme == v].mean() for v in np.unique(viseme)}
    assert len(per_viseme) >= 5
    assert per_viseme[Viseme.OPEN] > per_viseme[Viseme.SPREAD] > per_viseme[Viseme.CLOSED]
    assert per_viseme[Viseme.ROUNDED] > per_viseme[Viseme.CLOSED]
    for m in meta:
        lm = m["landmarks"]
        gap = np.linalg.norm(lm[:, 66] - lm[:, 62], axis=-1)
        width = np.linalg.norm(lm[:, 16] - lm[:, 0], axis=-1)
        np.testing.assert_allclose(gap / width, m["mouth_open"], atol=1e-4)
        # The chin drops with the opening mouth (the jaw moves, not only the lips).
        chin = np.linalg.norm(lm[:, 8] - lm[:, 27], axis=-1) / width
        assert np.corrcoef(chin, m["mouth_open"])[0, 1] > 0.8


def _band_energy(audio, sample_rate, low, high):
    freqs, power = signal.welch(audio, sample_rate, nperseg=256)
    return power[(freqs >= low) & (freqs < high)].sum()


def test_speech_spectra_tell_visemes_apart_beyond_loudness(dataset):
    """Rounded and spread vowels differ in F2; f/v are hiss; m is a low hum."""
    ratios: dict[str, list[float]] = {}
    for i in range(3):
        meta = np.load(dataset / f"id00{i}/clip000.npz")
        audio, sr = meta["audio"], int(meta["sample_rate"])
        for name, start, end in zip(
            meta["phoneme"], meta["phoneme_start"], meta["phoneme_end"], strict=True
        ):
            middle = audio[start + (end - start) // 4 : end - (end - start) // 4]
            if len(middle) < 400 or str(name) not in "aeioumfs":
                continue
            high = _band_energy(middle, sr, 1500, 3500)
            low = _band_energy(middle, sr, 100, 1000)
            ratios.setdefault(str(name), []).append(np.log10(high / low))
    med = {k: np.median(v) for k, v in ratios.items()}
    rounded = [med[k] for k in "ou" if k in med]
    spread = [med[k] for k in "ie" if k in med]
    assert rounded and spread and min(spread) > max(rounded) + 0.3
    for fricative in "fs":
        if fricative in med and "m" in med:
            assert med[fricative] > med["m"] + 1.0
    assert {PHONEMES[k].viseme for k in med} >= {Viseme.ROUNDED, Viseme.SPREAD}


def test_identities_differ_and_heads_move_and_blink(dataset):
    index = json.loads((dataset / "index.json").read_text())
    ids = index["identities"]
    voices = [ids[k]["voice"]["f0"] for k in sorted(ids)]
    assert len({round(v) for v in voices}) == 3
    first = [read_video(dataset / f"id00{i}/clip000.mp4").frames[0].astype(float) for i in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(first[a] - first[b]).mean() > 15
    assert set(index["splits"]["test"]).isdisjoint(index["splits"]["train"])
    meta = np.load(dataset / "id000/clip000.npz")
    nose = meta["landmarks"][:, 30]
    assert np.ptp(nose, axis=0).max() > 1.0, "the head should drift"
    eye_open = meta["eye_open"]
    assert eye_open.min() < 0.3 and np.median(eye_open) > 0.95


def test_same_seed_same_bytes_other_seed_other_faces(tmp_path):
    small = SyntheticConfig(identities=1, clips=1, seconds=0.4, size=64, seed=11)
    generate_dataset(small, tmp_path / "a")
    generate_dataset(small, tmp_path / "b")
    for name in ("id000/clip000.mp4", "id000/clip000.npz", "index.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = SyntheticConfig(identities=1, clips=1, seconds=0.4, size=64, seed=12)
    generate_dataset(other, tmp_path / "c")
    a = np.load(tmp_path / "a/id000/clip000.npz")["landmarks"]
    c = np.load(tmp_path / "c/id000/clip000.npz")["landmarks"]
    assert not np.allclose(a, c)


def test_rerun_skips_finished_clips_and_redoes_missing_ones(tmp_path):
    small = SyntheticConfig(identities=1, clips=2, seconds=0.4, size=64, seed=5)
    generate_dataset(small, tmp_path)
    kept, redo = tmp_path / "id000/clip000.npz", tmp_path / "id000/clip001.npz"
    before = redo.read_bytes()
    kept_mtime = kept.stat().st_mtime_ns
    redo.unlink()
    generate_dataset(small, tmp_path)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert redo.read_bytes() == before
