"""Load joonson/syncnet_python's `syncnet_v2.model` into `dithead_jax.models.syncnet.SyncNet`.

The file (http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model, fetched by
syncnet_python's `download_model.sh`; Wav2Lip's LSE scripts default to
`data/syncnet_v2.model`) is a `torch.save`d state_dict of `SyncNetModel.S`:

    netcnnaud.{0,4,8,11,14,18}.weight|bias               Conv2d (O, I, kh, kw)
    netcnnaud.{1,5,9,12,15,19}.weight|bias|running_mean|running_var   BatchNorm2d
    netcnnlip.{0,4,8,11,14,18}.weight|bias               Conv3d (O, I, kt, kh, kw)
    netcnnlip.{1,5,9,12,15,19}.*                         BatchNorm3d
    netfcaud.{0,3}.weight|bias, netfclip.{0,3}.*         Linear (out, in)
    netfcaud.1.*, netfclip.1.*                           BatchNorm1d

(`num_batches_tracked` may or may not be present; it is ignored.) Also accepted: the same
keys under a `__S__.` (a `SyncNetInstance` state_dict) or `module.` prefix, a dict holding
the state_dict under "state_dict", and a pickled whole `S` module (`torch.save(model)`),
which is read without the `SyncNetModel` source and without running pickled code (see
`_torch_load`).

Every BatchNorm is folded into the layer before it, in float64:
    s = gamma / sqrt(running_var + eps);  W' = W * s (per output channel);
    b' = (b - running_mean) * s + beta
"""

from __future__ import annotations

import collections
import functools
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax.convert.weights import find_weights
from dithead_jax.models.syncnet import (
    AUDIO_CONVS,
    BN_EPS,
    FC_TORCH_INDICES,
    FEATURE_DIM,
    LIP_CONVS,
    ConvSpec,
    FrozenConv,
    FrozenDense,
    SyncNet,
)

SYNCNET_FILE = "syncnet_v2.model"
_PREFIXES = ("__S__.", "module.", "S.")


def _as_numpy(x: Any) -> np.ndarray:
    # torch tensors without importing torch: they all offer .detach().cpu().numpy().
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def normalize_state_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """float64 numpy copy with wrapper prefixes stripped; only `net*` keys are kept."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if name.startswith("net") and not name.endswith("num_batches_tracked"):
            out[name] = _as_numpy(value)
    return out


def _get(state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in state:
        raise KeyError(f"SyncNet weight {key!r} missing; got keys like {sorted(state)[:6]}")
    value = state[key]
    if value.shape != shape:
        raise ValueError(f"{key}: expected shape {shape}, got {value.shape}")
    return value


def _bn_scale_shift(
    state: Mapping[str, np.ndarray], prefix: str, channels: int, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """The eval-mode BatchNorm as y = x * scale + shift."""
    gamma = _get(state, f"{prefix}.weight", (channels,))
    beta = _get(state, f"{prefix}.bias", (channels,))
    mean = _get(state, f"{prefix}.running_mean", (channels,))
    var = _get(state, f"{prefix}.running_var", (channels,))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _set(variable: Any, value: np.ndarray) -> None:
    if tuple(variable.shape) != value.shape:
        raise ValueError(f"shape mismatch: model {variable.shape}, checkpoint {value.shape}")
    variable.set_value(jnp.asarray(value, jnp.float32))


def _load_conv(
    conv: FrozenConv, spec: ConvSpec, state: Mapping[str, np.ndarray], tower: str, eps: float
) -> None:
    weight = _get(state, f"{tower}.{spec.torch_index}.weight", spec.torch_kernel)
    bias = _get(state, f"{tower}.{spec.torch_index}.bias", (spec.out_channels,))
    scale, shift = _bn_scale_shift(state, f"{tower}.{spec.torch_index + 1}", spec.out_channels, eps)
    if spec.temporal is None:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
        kernel = weight.transpose(2, 3, 1, 0)
    else:  # Conv3d (O, I, kt, kh, kw) -> (kh, kw, kt, I, O) -> (kh, kw, kt * I, O)
        kernel = weight.transpose(3, 4, 2, 1, 0).reshape(*spec.kernel, spec.in_channels, -1)
    _set(conv.kernel, kernel * scale)
    _set(conv.bias, bias * scale + shift)


def _load_fc(
    layers: Any, state: Mapping[str, np.ndarray], tower: str, embed_dim: int, eps: float
) -> None:
    first, last = FC_TORCH_INDICES
    dense0: FrozenDense = layers[0]
    weight = _get(state, f"{tower}.{first}.weight", (FEATURE_DIM, FEATURE_DIM))
    bias = _get(state, f"{tower}.{first}.bias", (FEATURE_DIM,))
    scale, shift = _bn_scale_shift(state, f"{tower}.{first + 1}", FEATURE_DIM, eps)
    _set(dense0.kernel, weight.T * scale)
    _set(dense0.bias, bias * scale + shift)
    dense1: FrozenDense = layers[1]
    _set(dense1.kernel, _get(state, f"{tower}.{last}.weight", (embed_dim, FEATURE_DIM)).T)
    _set(dense1.bias, _get(state, f"{tower}.{last}.bias", (embed_dim,)))


def assign_syncnet_weights(
    model: SyncNet, state_dict: Mapping[str, Any], eps: float = BN_EPS
) -> SyncNet:
    """Fold BatchNorms and write a `SyncNetModel.S` state_dict into `model` (in place)."""
    state = normalize_state_dict(state_dict)
    for tower, module, specs in (
        ("netcnnaud", model.audio, AUDIO_CONVS),
        ("netcnnlip", model.lip, LIP_CONVS),
    ):
        for conv, spec in zip(module.convs, specs, strict=True):
            _load_conv(conv, spec, state, tower, eps)
    _load_fc(model.audio.fc, state, "netfcaud", model.embed_dim, eps)
    _load_fc(model.lip.fc, state, "netfclip", model.embed_dim, eps)
    return model


def _embed_dim(state_dict: Mapping[str, Any]) -> int:
    state = normalize_state_dict(state_dict)
    return int(state["netfclip.3.weight"].shape[0]) if "netfclip.3.weight" in state else 1024


def syncnet_from_state_dict(state_dict: Mapping[str, Any], **syncnet_kwargs: Any) -> SyncNet:
    """A `SyncNet` holding these weights (tensors or arrays, keys as in the module doc)."""
    embed_dim = syncnet_kwargs.pop("embed_dim", None) or _embed_dim(state_dict)
    # Abstract construction: no random weights drawn only to be overwritten.
    model = nnx.eval_shape(lambda: SyncNet(rngs=nnx.Rngs(0), embed_dim=embed_dim, **syncnet_kwargs))
    return assign_syncnet_weights(model, state_dict)


def random_state_dict(seed: int = 0, embed_dim: int = 1024) -> dict[str, np.ndarray]:
    """A `SyncNetModel.S` state_dict (all keys and shapes of syncnet_v2.model) with random
    weights, drawn in numpy: building a random `SyncNet` through `syncnet_from_state_dict`
    takes milliseconds, where jax.random compiles one sampler per weight shape (~1 s each
    on a busy CPU). He-normal convs and linears, first layers scaled for raw inputs
    (pixels ~128, MFCCs ~10), BatchNorms near identity, a small last linear (real
    embeddings are ~0.3 per element)."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}

    def batchnorm(prefix: str, channels: int) -> None:
        state[f"{prefix}.weight"] = rng.uniform(0.8, 1.2, channels)
        state[f"{prefix}.bias"] = rng.uniform(-0.1, 0.1, channels)
        state[f"{prefix}.running_mean"] = rng.uniform(-0.1, 0.1, channels)
        state[f"{prefix}.running_var"] = rng.uniform(0.8, 1.2, channels)

    for tower, specs, input_scale in (
        ("netcnnaud", AUDIO_CONVS, 10.0),
        ("netcnnlip", LIP_CONVS, 128.0),
    ):
        for i, spec in enumerate(specs):
            fan_in = spec.kernel[0] * spec.kernel[1] * spec.in_channels
            std = (2.0 / fan_in) ** 0.5 / (input_scale if i == 0 else 1.0)
            state[f"{tower}.{spec.torch_index}.weight"] = std * rng.standard_normal(
                spec.torch_kernel
            )
            state[f"{tower}.{spec.torch_index}.bias"] = np.zeros(spec.out_channels)
            batchnorm(f"{tower}.{spec.torch_index + 1}", spec.out_channels)
    first, last = FC_TORCH_INDICES
    for head in ("netfcaud", "netfclip"):
        std = (2.0 / FEATURE_DIM) ** 0.5
        state[f"{head}.{first}.weight"] = std * rng.standard_normal((FEATURE_DIM, FEATURE_DIM))
        state[f"{head}.{first}.bias"] = np.zeros(FEATURE_DIM)
        batchnorm(f"{head}.{first + 1}", FEATURE_DIM)
        state[f"{head}.{last}.weight"] = 0.15 * std * rng.standard_normal((embed_dim, FEATURE_DIM))
        state[f"{head}.{last}.bias"] = np.zeros(embed_dim)
    return {k: v.astype(np.float32) for k, v in state.items()}


@functools.cache
def _stub_module_class() -> type:
    """An empty `torch.nn.Module` subclass standing in for classes a whole-module pickle
    names but we do not have (`SyncNetModel.S`). Made lazily: torch is optional here."""
    import torch

    class _Stub(torch.nn.Module):
        pass

    return _Stub


def _whole_module_state_dict(path: Path) -> Mapping[str, Any]:
    """state_dict of a `torch.save(model)` file, read with torch's weights-only unpickler.

    That unpickler runs no pickled code; it only builds allow-listed classes. We allow the
    torch.nn layers S is made of and map every other class (the `S` itself, whose source
    we may not have) to an empty `nn.Module` stub, which restores the submodules and
    buffers all the same.
    """
    import torch

    nn = torch.nn
    allowed = [
        nn.Sequential,
        nn.Conv2d,
        nn.Conv3d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.Linear,
        nn.Module,
        collections.OrderedDict,
        torch._utils._rebuild_parameter,  # how every pickled nn.Parameter is rebuilt
        torch.nn.parameter.Parameter,
        set,
    ]
    stub = _stub_module_class()
    for _ in range(8):  # one round per unknown class named in the file
        try:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # torch raises UnpicklingError or RuntimeError
            match = re.search(r"GLOBAL ([\w.]+)\.(\w+) was not an allowed global", str(e))
            if not match:
                raise _pickle_error(path, e) from e
            module, name = match.groups()
            if module.startswith(("torch", "builtins", "collections")):
                # A real library class we did not expect: refuse rather than guess.
                raise _pickle_error(path, e) from e
            # safe_globals accepts (object, "module.name") pairs for renamed classes.
            allowed.append((stub, f"{module}.{name}"))
    else:
        raise RuntimeError(f"{path}: too many unknown classes in the pickle")
    if not hasattr(obj, "state_dict"):
        raise TypeError(f"{path}: expected a state_dict or an nn.Module, got {type(obj)}")
    return obj.state_dict()


def _trusted_whole_module_state_dict(path: Path) -> Mapping[str, Any]:
    """Full unpickling (runs whatever the file says): only for files the user trusts.

    Needed for whole modules in torch's legacy (pre-1.6, non-zip) format, which the
    weights-only unpickler cannot read. Classes that cannot be imported become stubs.
    """
    import pickle
    import types

    import torch

    stub = _stub_module_class()

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return stub

    pickle_module = types.SimpleNamespace(
        Unpickler=_Unpickler, load=lambda f, **kw: _Unpickler(f, **kw).load(), __name__="pickle"
    )
    with warnings.catch_warnings():
        # torch compares the class source stored in legacy files with the (stub) class.
        warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)
    return obj if isinstance(obj, Mapping) else obj.state_dict()


def read_syncnet_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Mapping[str, Any]:
    """The state_dict in `path`: a saved state_dict (the published file), or a whole pickled
    `S` module. trust_pickle: allow full unpickling, needed only for whole modules saved in
    torch's legacy format; never needed for state_dicts."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (the CPU build is enough)") from e
    path = Path(path)
    if trust_pickle:
        return _trusted_whole_module_state_dict(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch wraps everything in UnpicklingError
        if "not an allowed global" in str(e):
            return _whole_module_state_dict(path)
        raise _pickle_error(path, e) from e
    if isinstance(state, Mapping):
        return state
    if hasattr(state, "state_dict"):
        return state.state_dict()
    raise TypeError(f"{path}: expected a state_dict, got {type(state)}")


def _pickle_error(path: Path, cause: Exception) -> Exception:
    return RuntimeError(
        f"{path}: cannot read with torch's weights-only loader ({type(cause).__name__}). "
        "A whole module saved in torch's legacy format needs full unpickling, which can "
        "run code from the file: if you trust it, pass trust_pickle=True."
    )


def load_syncnet(
    path: str | Path | None = None, *, trust_pickle: bool = False, **syncnet_kwargs: Any
) -> SyncNet:
    """Pretrained SyncNet v2. path: the `syncnet_v2.model` file, or None to look it up with
    `find_weights("syncnet_v2.model")` (raises FileNotFoundError naming every path tried).
    trust_pickle: see `read_syncnet_checkpoint`. syncnet_kwargs go to `SyncNet` (dtype,
    precision)."""
    path = Path(path) if path is not None else find_weights(SYNCNET_FILE)
    state = read_syncnet_checkpoint(path, trust_pickle=trust_pickle)
    return syncnet_from_state_dict(state, **syncnet_kwargs)
