"""SyncNet v2 + LSE-D / LSE-C: importer parity with PyTorch, the scoring procedure (int16
audio, python_speech_features MFCCs, cv2 resize, BGR, windows, batches) against a slow
loop-by-loop reference, and the "unavailable" result without weights.

No real SyncNet weights exist offline, so every network here has random weights.
"""

from __future__ import annotations

import sys
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from dithead_jax.convert.syncnet_weights import (
    SYNCNET_FILE,
    load_syncnet,
    random_state_dict,
    read_syncnet_checkpoint,
    syncnet_from_state_dict,
)
from dithead_jax.evaluation import sync
from dithead_jax.models.syncnet import AUDIO_CONVS, LIP_CONVS, SyncNet

nn = torch.nn


# ---------------------------------------------------------------------------------------
# PyTorch reference: SyncNetModel.S rebuilt from the layer tables, with its key names
# ---------------------------------------------------------------------------------------


def _torch_tower(specs, three_d: bool) -> nn.Sequential:
    """The original nn.Sequential, layer for layer, so the state_dict keys (and the
    conv/BN indices 0, 1, 4, 5, ...) are those of syncnet_v2.model."""
    conv, bn, pool = (
        (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)
        if three_d
        else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
    )
    layers: list[nn.Module] = []
    for spec in specs:
        assert len(layers) == spec.torch_index
        cin = spec.in_channels // (spec.temporal or 1)
        if three_d:
            kernel = (spec.temporal, *spec.kernel)
            stride, padding = (1, *spec.stride), (0, *spec.padding)
        else:
            kernel, stride, padding = spec.kernel, spec.stride, spec.padding
        layers += [conv(cin, spec.out_channels, kernel, stride, padding), bn(spec.out_channels)]
        layers.append(nn.ReLU())
        p = spec.pool
        if p is not None:
            args = ((1, *p.kernel), (1, *p.stride), (0, *p.padding)) if three_d else p
            layers.append(pool(*args) if three_d else pool(p.kernel, p.stride, p.padding))
        elif not three_d and spec.torch_index == 0:
            layers.append(nn.MaxPool2d(1, 1))  # the original's no-op pool keeps the indices
    return nn.Sequential(*layers)


def _torch_head(embed: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed))


class TorchS(nn.Module):
    def __init__(self, embed: int = 1024):
        super().__init__()
        self.netcnnaud = _torch_tower(AUDIO_CONVS, three_d=False)
        self.netfcaud = _torch_head(embed)
        self.netfclip = _torch_head(embed)
        self.netcnnlip = _torch_tower(LIP_CONVS, three_d=True)

    def forward_aud(self, x):  # (n, 1, 13, 20)
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x):  # (n, 3, 5, 224, 224) BGR 0..255
        return self.netfclip(self.netcnnlip(x).flatten(1))


def _random_torch_syncnet(seed: int = 0) -> TorchS:
    """Random weights with BatchNorm statistics that matter: one train-mode pass with
    momentum 1 sets running stats to real batch stats (activations stay O(1) through all
    layers), then random affine parameters make the folded scales differ per channel."""
    torch.manual_seed(seed)
    model = TorchS()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model.forward_lip(torch.rand(3, 3, 5, 224, 224) * 255)
        model.forward_aud(torch.randn(6, 1, 13, 20) * 8)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        # Embeddings of the real network are O(0.1-1) per element (LSE-D, a distance
        # between two 1024-d embeddings, is 5-12); random heads give ~10x that.
        for head in (model.netfclip, model.netfcaud):
            head[3].weight.mul_(0.1)
            head[3].bias.mul_(0.1)
    return model.eval()


@pytest.fixture(scope="module")
def torch_syncnet() -> TorchS:
    return _random_torch_syncnet()


def test_importer_matches_pytorch_forward(torch_syncnet, tmp_path):
    # A legacy-format (pre-zip) state_dict file, like the 2017 syncnet_v2.model.
    path = tmp_path / SYNCNET_FILE
    torch.save(torch_syncnet.state_dict(), path, _use_new_zipfile_serialization=False)
    model = load_syncnet(path)

    rng = np.random.default_rng(1)
    lips = rng.integers(0, 256, (2, 5, 224, 224, 3)).astype(np.float32)  # (b, t, h, w, c)
    mfcc = (rng.standard_normal((5, 13, 20)) * 8).astype(np.float32)
    with torch.no_grad():
        want_lip = torch_syncnet.forward_lip(torch.from_numpy(lips.transpose(0, 4, 1, 2, 3)))
        want_aud = torch_syncnet.forward_aud(torch.from_numpy(mfcc[:, None]))
    got_lip = np.asarray(jax.jit(lambda m, x: m.embed_lips(x))(model, lips))
    got_aud = np.asarray(jax.jit(lambda m, x: m.embed_audio(x))(model, mfcc))
    lip_err = np.abs(got_lip - want_lip.numpy()).max()
    aud_err = np.abs(got_aud - want_aud.numpy()).max()
    print(
        f"lip max|diff| {lip_err:.2e} (scale {np.abs(want_lip.numpy()).max():.2f}), "
        f"audio {aud_err:.2e} (scale {np.abs(want_aud.numpy()).max():.2f})"
    )
    assert np.abs(want_lip.numpy()).max() > 0.5  # a meaningful, non-degenerate output
    assert np.abs(want_aud.numpy()).max() > 0.5
    assert lip_err <= 1e-4 and aud_err <= 1e-4


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_importer_key_variants(torch_syncnet, tmp_path, monkeypatch):
    """`__S__.`-prefixed dicts and whole pickled modules (class source absent) give the
    same weights as the plain state_dict."""
    state = torch_syncnet.state_dict()
    plain = syncnet_from_state_dict(state)
    prefixed = syncnet_from_state_dict({f"__S__.{k}": v for k, v in state.items()})

    # torch.save(model) of a class named SyncNetModel.S, then load without that module.
    fake = types.ModuleType("SyncNetModel")
    fake.S = type("S", (TorchS,), {"__module__": "SyncNetModel"})
    monkeypatch.setitem(sys.modules, "SyncNetModel", fake)
    whole = fake.S.__new__(fake.S)
    whole.__dict__.update(torch_syncnet.__dict__)
    torch.save(whole, tmp_path / "whole.model")
    torch.save(whole, tmp_path / "legacy.model", _use_new_zipfile_serialization=False)
    monkeypatch.delitem(sys.modules, "SyncNetModel")
    from_whole = syncnet_from_state_dict(read_syncnet_checkpoint(tmp_path / "whole.model"))
    with pytest.raises(RuntimeError, match="trust_pickle"):
        read_syncnet_checkpoint(tmp_path / "legacy.model")
    from_legacy = load_syncnet(tmp_path / "legacy.model", trust_pickle=True)

    want = jax.tree.leaves(nnx.state(plain))
    for other in (prefixed, from_whole, from_legacy):
        for a, b in zip(want, jax.tree.leaves(nnx.state(other)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------
# The scoring procedure against a direct, slow reference
# ---------------------------------------------------------------------------------------


def _reference_embeddings(model: SyncNet, frames: np.ndarray, audio: np.ndarray):
    """syncnet_python's evaluate() up to the features, one window at a time, with the
    original libraries (python_speech_features, cv2)."""
    import cv2
    import python_speech_features

    samples = np.clip(np.rint(audio.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    coeffs = python_speech_features.mfcc(samples, 16000).T  # (13, steps)
    bgr = np.stack([cv2.resize(f[..., ::-1], (224, 224)) for f in frames]).astype(np.float32)

    min_length = min(len(frames), len(samples) // 640)
    lip_fn = jax.jit(lambda m, x: m.embed_lips(x))
    aud_fn = jax.jit(lambda m, x: m.embed_audio(x))
    lips, auds = [], []
    for i in range(min_length - 5):
        lips.append(np.asarray(lip_fn(model, bgr[None, i : i + 5]))[0])
        window = coeffs[:, 4 * i : 4 * i + 20].astype(np.float32)
        auds.append(np.asarray(aud_fn(model, window[None]))[0])
    return np.stack(lips), np.stack(auds)


def _reference_scores(lips: np.ndarray, auds: np.ndarray, vshift: int):
    """calc_pdist + evaluate()'s reductions, one (frame, offset) pair at a time, float64."""
    n = len(lips)
    mean = np.zeros(2 * vshift + 1)
    for k in range(2 * vshift + 1):
        for i in range(n):
            j = i + k - vshift
            a = auds[j].astype(np.float64) if 0 <= j < n else np.zeros(auds.shape[1])
            mean[k] += np.sqrt(np.sum((lips[i].astype(np.float64) - a + 1e-6) ** 2)) / n
    best = int(np.argmin(mean))
    return mean, mean[best], np.sort(mean)[vshift] - mean[best], vshift - best


def _assert_scores_match(got: dict, want: tuple, tol: float = 1e-5) -> None:
    mean, lse_d, lse_c, offset = want
    print(f"LSE-D {got['lse_d']:.7f} vs {lse_d:.7f}, LSE-C {got['lse_c']:.7f} vs {lse_c:.7f}")
    assert got["status"] == "ok"
    np.testing.assert_allclose(got["mean_dists"], mean, rtol=0, atol=tol)
    assert abs(got["lse_d"] - lse_d) <= tol and abs(got["lse_c"] - lse_c) <= tol
    assert got["offset"] == offset


def test_lse_procedure_matches_slow_reference():
    """The whole path (int16, MFCC, resize, BGR, windows, batches, distances, scores) on a
    random-weight network. 6 windows keep it affordable on CPU (~0.4 s per lip window), so
    the offset range is +-4 here; +-15 is covered on embeddings below."""
    model = syncnet_from_state_dict(random_state_dict(0))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8).repeat(32, 1).repeat(32, 2)
    # 11 frames' worth of audio (and a bit) for 12 frames of video: the audio decides the
    # length, min(#frames, #samples // 640) = 11 -> 6 windows (batches of 4: 4 + 2 padded).
    audio = (0.3 * rng.standard_normal(640 * 11 + 300)).clip(-1, 1).astype(np.float32)

    got = sync.SyncScorer(model, vshift=4, batch_size=4)(frames, audio)
    assert got["num_windows"] == 11 - 5
    lips, auds = _reference_embeddings(model, frames, audio)
    _assert_scores_match(got, _reference_scores(lips, auds, vshift=4))
    assert got["lse_c"] > 0  # distinct offsets really give distinct mean distances


def test_lse_scores_vshift15_match_slow_reference():
    """Distances and scores at the evaluation's +-15 frames, on 40 windows of embeddings
    whose true alignment is known (audio = video shifted by 3 frames, plus noise)."""
    rng = np.random.default_rng(0)
    video = (0.3 * rng.standard_normal((40, 1024))).astype(np.float32)
    audio = (np.roll(video, 3, axis=0) + 0.2 * rng.standard_normal((40, 1024))).astype(np.float32)
    dists = np.asarray(sync.sync_distances(video, audio, vshift=15))
    got = sync.scores_from_distances(dists, vshift=15)
    want = _reference_scores(video, audio, vshift=15)
    _assert_scores_match(got, want)
    assert got["offset"] == -3  # video[i] matches audio[i + 3]: the video leads


def test_offset_sign_and_zero_padding():
    """Video embedding i equal to audio embedding i - 2 (the video lags the audio by two
    frames): the AV offset is +2, and out-of-range audio counts as a zero vector."""
    rng = np.random.default_rng(0)
    video = rng.standard_normal((40, 16)).astype(np.float32)
    audio = np.roll(video, -2, axis=0)  # audio[i] = video[i + 2], i.e. video[i] = audio[i - 2]
    dists = np.asarray(sync.sync_distances(video, audio, vshift=15))
    assert dists.shape == (40, 31)
    scores = sync.scores_from_distances(dists, vshift=15)
    assert scores["offset"] == 2
    assert dists[10, 15 - 2] == pytest.approx(np.sqrt(16) * 1e-6, rel=0.05)  # eps only
    np.testing.assert_allclose(dists[0, 0], np.linalg.norm(video[0] + 1e-6), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Audio samples as ffmpeg writes them
# ---------------------------------------------------------------------------------------


def test_audio_to_int16_is_ffmpeg_pcm_s16le():
    audio = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.5, 3.0517578125e-05 * 2.5], np.float32)
    np.testing.assert_array_equal(
        sync.audio_to_int16(audio), [0, 16384, -16384, 32767, -32768, 32767, 2]
    )
    ints = np.array([1, -2, 300], np.int16)
    np.testing.assert_array_equal(sync.audio_to_int16(ints), ints)


# ---------------------------------------------------------------------------------------
# No weights: "unavailable", naming the file
# ---------------------------------------------------------------------------------------


def test_missing_weights_reports_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("DITHEAD_WEIGHTS", str(tmp_path))
    sync._default_scorer.cache_clear()
    frames = np.zeros((10, 32, 32, 3), np.uint8)
    result = sync.lse_scores(frames, np.zeros(6400, np.float32))
    assert result["status"] == "unavailable"
    assert result["lse_d"] is None and result["lse_c"] is None
    assert SYNCNET_FILE in result["reason"] and str(tmp_path / SYNCNET_FILE) in result["reason"]
    # The file appearing later in the process is picked up (the failure is not cached).
    assert not sync.SyncScorer().available
