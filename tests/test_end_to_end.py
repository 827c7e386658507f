"""The whole system as a user runs it, at toy sizes: synthetic videos -> preprocess -> VQGAN
-> latents -> DiT -> sample.py (evaluation report and a generated mp4). Each command is the
real CLI in its own process; the models are too small and short-trained to be any good,
so this checks the wiring (formats, provenance, shapes, files), not quality."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from dithead_jax.data import records
from dithead_jax.data.latents import latent_mask
from dithead_jax.data.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"{args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def test_videos_to_report_and_mp4(tmp_path):
    syn, stage1, vq = tmp_path / "syn", tmp_path / "stage1", tmp_path / "vq"
    latents, dit, report = tmp_path / "latents", tmp_path / "dit", tmp_path / "report"
    run("data/synthetic.py", "--out", str(syn), "--identities", "2", "--clips", "1",
        "--seconds", "1.6", "--size", "64", "--seed", "1")  # fmt: skip
    run("data/preprocess.py", "--input", str(syn), "--out", str(stage1),
        "--landmarks", "sidecar", "--size", "32", "--margin", "0.3")  # fmt: skip
    meta = json.loads((stage1 / "dataset" / "metadata.json").read_text())
    assert meta["provenance"]["margin"] == 0.3  # sample.py crops new videos the same way
    run("train.py", "--config", "configs/vqgan.py:testing", "--workdir", str(vq),
        f"--config.data.dir={stage1}", "--config.train.num_steps=2",
        "--config.train.checkpoint_every=2")  # fmt: skip
    # One VQGAN serves as E/D and E_m here (two would only double the time).
    out = run("data/encode_latents.py", "--dataset", str(stage1), "--vqgan", str(vq),
              "--vqgan-masked", str(vq), "--out", str(latents), "--mask-variants", "2")  # fmt: skip
    assert "stage-2 dataset" in out
    meta = json.loads((latents / "dataset" / "metadata.json").read_text())
    assert meta["kind"] == "stage2" and meta["num_masked"] == 2
    # Recorded relative to the dataset's metadata folder: the tree of runs can move.
    assert meta["provenance"]["vqgan_workdir"] == str(Path("..", "..", "vq"))
    # Each latent record carries its frame's lower-face mask on the latent grid (32 / 8).
    frames, _ = records.open_dataset(stage1, "train")
    codes, _ = records.open_dataset(latents, "train")
    np.testing.assert_array_equal(codes[3]["mask"], latent_mask(frames[3]["mask"][None], 8)[0])
    run("train.py", "--config", "configs/dit.py:testing", "--workdir", str(dit),
        f"--config.data.dir={latents}", "--config.model.input_size=8",
        "--config.diffusion.mask_weight=4",
        "--config.data.min_reference_distance=5", "--config.train.num_steps=2",
        "--config.train.checkpoint_every=2", "--config.train.image_every=2")  # fmt: skip
    run(
        "sample.py",
        "--workdir",
        str(dit),
        "--eval",
        "--dataset",
        str(stage1),
        "--synthetic",
        str(syn),
        "--max-clips",
        "1",
        "--max-frames",
        "12",
        "--steps",
        "2",
        "--metrics",
        "lse",
        "--out",
        str(report),
    )  # fmt: skip  (LPIPS/FID: their own tests)
    result = json.loads((report / "report.json").read_text())
    assert result["metrics"]["psnr"] > 0 and 0 < result["metrics"]["ssim"] <= 1
    assert "syncnet_v2.model" in result["unavailable"]["lse_c"]
    assert set(result["sync"]) == {
        "correlation", "control_correlation", "expert_calibration", "vqgan_ceiling"
    }  # fmt: skip
    assert all(-1 <= v <= 1 for v in result["sync"].values())
    assert result["clips"][0]["flicker"] > 0
    assert "DiT-Head (paper, HDTF)" in (report / "report.md").read_text()
    assert len(list(report.glob("*.mp4"))) == 1
    # A video driven by another clip's (longer) audio: looped, and exactly that long.
    video, audio = syn / "id000/clip000.mp4", syn / "id001/clip000.mp4"
    # From an exported folder (python -m dithead_jax.export), moved: --model takes either.
    run("-m", "dithead_jax.export", "--workdir", str(dit), "--out", str(tmp_path / "export"))
    (tmp_path / "export").rename(tmp_path / "moved")
    out_mp4 = tmp_path / "out.mp4"
    run("sample.py", "--model", str(tmp_path / "moved"), "--video", str(video), "--audio",
        str(audio), "--out", str(out_mp4), "--steps", "2")  # fmt: skip
    media = read_video(out_mp4)
    source = read_video(video)
    assert media.frames.shape == source.frames.shape
    assert abs(len(media.audio) / media.sample_rate - len(media.frames) / 25) <= 1 / 25
    # Outside the lower-face mask the source video is untouched (up to the codec).
    top = slice(0, 20)
    assert np.abs(media.frames[:, top].astype(int) - source.frames[:, top]).mean() < 3
