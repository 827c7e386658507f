"""IFNet (models/ifnet.py) and its importer (convert/rife_weights.py) against PyTorch.

The reference is `ccvfi`'s IFNet: Practical-RIFE 4.25 / 4.26's `IFNet_HDv3` as shipped on
PyPI (requirements-nodeps.txt). Its package __init__ imports torchvision and tenacity, so the
two module files we need (the network and RIFE's `warp`) are loaded on their own, with the
package's registry imports answered by stand-ins.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from dithead_jax.config import ConfigError, IFNetConfig
from dithead_jax.convert import rife_weights
from dithead_jax.models import ifnet

# Reduced widths (the reference's IFBlock takes any width) and 2 of the 8 residual convs per
# block (compiles 2x faster); everything else as released.
SMALL = IFNetConfig(block_channels=(24, 16, 16, 8, 8), res_convs=2, pad_multiple=64)


@pytest.fixture(scope="module")
def reference() -> types.SimpleNamespace:
    """ccvfi's `ifnet_arch` and `warplayer` modules, imported without the package."""
    spec = importlib.util.find_spec("ccvfi")
    assert spec is not None, "pip install --no-deps -r requirements-nodeps.txt (ccvfi)"
    root = Path(spec.submodule_search_locations[0])
    registry = types.SimpleNamespace(register=lambda name=None: lambda cls: cls)
    stand_ins = {
        "ccvfi": types.ModuleType("ccvfi"),
        "ccvfi.arch": types.SimpleNamespace(ARCH_REGISTRY=registry),
        "ccvfi.arch.arch_utils": types.ModuleType("ccvfi.arch.arch_utils"),
        "ccvfi.type": types.SimpleNamespace(ArchType=types.SimpleNamespace(IFNET="IFNET")),
    }
    saved = {
        name: sys.modules.get(name) for name in [*stand_ins, "ccvfi.arch.arch_utils.warplayer"]
    }
    try:
        sys.modules.update(stand_ins)
        modules = {}
        for name, relative in (
            ("ccvfi.arch.arch_utils.warplayer", "arch/arch_utils/warplayer.py"),
            ("ccvfi_ifnet_arch", "arch/ifnet_arch.py"),
        ):
            module_spec = importlib.util.spec_from_file_location(name, root / relative)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            modules[name] = module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.modules.pop("ccvfi_ifnet_arch", None)
    arch = modules["ccvfi_ifnet_arch"]
    return types.SimpleNamespace(arch=arch, warp=modules["ccvfi.arch.arch_utils.warplayer"].warp)


def small_reference(reference: types.SimpleNamespace) -> torch.nn.Module:
    """The reference IFNet with SMALL's block widths and random non-trivial weights."""
    torch.manual_seed(0)
    net = reference.arch.IFNet()
    in_first, in_later = 7 + 32, 8 + 4 + 8 + 32
    for i, c in enumerate(SMALL.block_channels):
        block = reference.arch.IFBlock(in_first if i == 0 else in_later, c=c)
        block.convblock = torch.nn.Sequential(*list(block.convblock)[: SMALL.res_convs])
        setattr(net, f"block{i}", block)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("beta"):  # released betas are not 1: exercise the reshape
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            if "lastconv" in name:  # flows of a few pixels, so warping is exercised
                p.mul_(4.0)
    return net.eval()


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def test_resize_matches_torch_interpolate():
    rng = np.random.default_rng(0)
    cases = [
        ((2, 64, 48, 5), 1 / 16),
        ((1, 37, 20, 3), 0.5),
        ((1, 37, 20, 3), 0.25),
        ((2, 4, 3, 4), 16.0),
        ((1, 9, 14, 2), 2.0),
        ((1, 10, 6, 2), 1 / 3),
        ((1, 3, 200, 2), 2.0),  # a 400 x 200 resize: gathers, not a matmul
    ]
    for shape, factor in cases:
        x = rng.standard_normal(shape).astype(np.float32)
        want = F.interpolate(to_nchw(x), scale_factor=factor, mode="bilinear", align_corners=False)
        got = np.asarray(ifnet.resize_bilinear(jnp.asarray(x), factor))
        assert got.shape == to_nhwc(want).shape, (shape, factor)
        np.testing.assert_allclose(got, to_nhwc(want), atol=1e-6, err_msg=f"{shape} x{factor}")


def test_warp_matches_grid_sample_values_and_flow_gradients(reference):
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(2, 12, 17, 3)).astype(np.float32)
    # Up to 20 px: many samples fall outside the frame and take the border.
    flow = rng.uniform(-20, 20, size=(2, 12, 17, 2)).astype(np.float32)
    weights = rng.standard_normal((2, 12, 17, 3)).astype(np.float32)
    flow_t = to_nchw(flow).requires_grad_(True)
    warped_t = reference.warp(to_nchw(image), flow_t)
    (warped_t * to_nchw(weights)).sum().backward()

    def objective(f):
        return (ifnet.backward_warp(jnp.asarray(image), f) * weights).sum()

    warped = ifnet.backward_warp(jnp.asarray(image), jnp.asarray(flow))
    np.testing.assert_allclose(np.asarray(warped), to_nhwc(warped_t), atol=2e-5)
    grad = jax.grad(objective)(jnp.asarray(flow))
    np.testing.assert_allclose(np.asarray(grad), to_nhwc(flow_t.grad), atol=2e-4)
    assert np.abs(np.asarray(grad)).max() > 0.1  # the test would notice a dead gradient


def test_released_layout_and_config_inference(reference):
    """The full released network's state_dict names and shapes are exactly RELEASED's."""
    state = reference.arch.IFNet().state_dict()
    assert rife_weights.infer_config(state) == ifnet.RELEASED
    model = nnx.eval_shape(lambda: ifnet.IFNet(ifnet.RELEASED, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param).flat_state()
    names = {rife_weights.torch_key(tuple(path)) for path, _ in params}
    assert names == set(state)
    assert sum(v.numel() for v in state.values()) == 5_723_156


@pytest.fixture(scope="module")
def parity_run(reference, tmp_path_factory):
    net = small_reference(reference)
    # Saved as the release is: DDP's "module." prefix, plus a training-only module.
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.teacher.lastconv.0.bias"] = torch.zeros(52)
    path = tmp_path_factory.mktemp("rife") / "flownet.pkl"
    torch.save(state, path)
    model = rife_weights.load_rife(path, SMALL)
    return net, model, path, state


@nnx.jit
def jitted_estimate(model: ifnet.IFNet, img0: jax.Array, img1: jax.Array, t: jax.Array) -> dict:
    return model.estimate(img0, img1, t)


@pytest.mark.parametrize("timestep", [0.5, (0.2, 0.85)])
def test_parity_with_pytorch_ifnet(parity_run, timestep):
    """Our IFNet with imported weights reproduces the reference's frame, every block's
    accumulated flow and fusion mask, on a frame size that needs padding (50x60 -> 64x64)."""
    net, model, _, _ = parity_run
    rng = np.random.default_rng(2)
    h, w = 50, 60
    img0, img1 = rng.uniform(size=(2, 2, h, w, 3)).astype(np.float32)

    block_outputs = []
    hooks = [
        getattr(net, f"block{i}").register_forward_hook(lambda m, i, o: block_outputs.append(o))
        for i in range(5)
    ]
    pad = lambda x: F.pad(to_nchw(x), (0, 64 - w, 0, 64 - h))  # noqa: E731
    x = torch.cat([pad(img0), pad(img1)], 1)
    t = timestep if np.isscalar(timestep) else torch.tensor(timestep).view(2, 1, 1, 1)
    t_ref = t if np.isscalar(t) else t.expand(2, 1, 64, 64).contiguous()
    with torch.no_grad():
        want = to_nhwc(net(x, t_ref, scale_list=[16, 8, 4, 2, 1]))[:, :h, :w]
    for hook in hooks:
        hook.remove()

    # One (B,) timestep shape for both cases: one compilation (jit is ~3x faster here than
    # running the ops eagerly).
    t_ours = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (2,))
    out = jitted_estimate(model, jnp.asarray(img0), jnp.asarray(img1), t_ours)
    error = np.abs(np.asarray(out["frame"]) - want).max()
    assert error < 1e-5, error

    flow = 0
    for i, (delta, mask, _) in enumerate(block_outputs):
        flow = flow + to_nhwc(delta)[:, :h, :w]
        np.testing.assert_allclose(np.asarray(out["flows"][i]), flow, atol=2e-4, err_msg=f"{i}")
        mask = torch.sigmoid(mask)
        np.testing.assert_allclose(np.asarray(out["masks"][i]), to_nhwc(mask)[:, :h, :w], atol=2e-5)
    # Random weights still move pixels by a few pixels: a non-trivial warp was compared.
    assert 0.5 < np.abs(flow).mean() < 50
    np.testing.assert_array_equal(np.asarray(out["merged"][-1]), np.asarray(out["frame"]))
    assert len(out["merged"]) == len(out["flows"]) == 5


def test_importer_errors(parity_run, tmp_path, monkeypatch):
    _, _, _, state = parity_run
    monkeypatch.setenv("DITHEAD_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as missing:
        rife_weights.load_rife()
    assert str(tmp_path / rife_weights.RIFE_FILE) in str(missing.value)

    wrong = dict(state)
    wrong["module.block2.convblock.1.conv.weight"] = torch.zeros(16, 16, 5, 5)
    path = tmp_path / "wrong_shape.pkl"
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"block2\.convblock\.1\.conv\.weight") as shape_error:
        rife_weights.load_rife(path, SMALL)
    assert str(path) in str(shape_error.value)

    lacking = {k: v for k, v in state.items() if k != "module.block4.lastconv.0.bias"}
    lacking["module.refine.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing block4\.lastconv\.0\.bias") as key_error:
        rife_weights.ifnet_from_state_dict(lacking, SMALL, where="lacking.pkl")
    assert "unexpected refine.weight" in str(key_error.value)
    assert "lacking.pkl" in str(key_error.value)


def test_jit_and_gradients_reach_every_block():
    # Random weights drawn in numpy: jax.random compiles one sampler per weight shape
    # (~1-2 s each on this CPU), which would dominate the test.
    abstract = nnx.eval_shape(lambda: ifnet.IFNet(ifnet.TESTING, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.3, 0.3, s.shape), s.dtype), shapes)
    img0, img1, target = jnp.asarray(rng.uniform(size=(3, 2, 24, 20, 3)), jnp.float32)

    def loss_fn(params):
        net = nnx.merge(graphdef, params)
        out = net.estimate(img0, img1, 0.5)
        # RIFE's reconstruction loss on every block's merged frame.
        loss = sum(jnp.abs(m - target).mean() for m in out["merged"])
        return loss, out["frame"]

    (loss, frame), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert np.isfinite(float(loss))
    assert float(frame.min()) >= 0 and float(frame.max()) <= 1
    for path, g in grads.flat_state():
        assert np.abs(np.asarray(g.get_value())).max() > 0, path


def test_config_validation():
    with pytest.raises(ConfigError, match="pad_multiple"):
        IFNetConfig(block_channels=(8, 8), scales=(2, 1), pad_multiple=4)
    with pytest.raises(ConfigError, match="scales"):
        IFNetConfig(block_channels=(8, 8), scales=(2,), pad_multiple=8)
    with pytest.raises(ConfigError, match="block_channels"):
        IFNetConfig(block_channels=(7, 8), scales=(2, 1), pad_multiple=8)
