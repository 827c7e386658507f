"""Load Practical-RIFE's released IFNet weights (`flownet.pkl`) into `models.ifnet.IFNet`.

The file is a `torch.save`d state_dict of `IFNet` (`train_log/IFNet_HDv3.py` of
Practical-RIFE 4.25 / 4.26, the architecture of `ifnet.RELEASED`), saved from a
DistributedDataParallel wrapper, so every key starts with `module.` (Practical-RIFE's own
loader keeps only those keys; a bare state_dict is accepted too):

    encode.cnn{0,1,2}.weight|bias                    Conv2d (O, I, 3, 3)
    encode.cnn3.weight|bias                          ConvTranspose2d (I, O, 4, 4)
    block{i}.conv0.{0,1}.0.weight|bias               Conv2d (the .1 is the LeakyReLU)
    block{i}.convblock.{j}.conv.weight|bias          Conv2d
    block{i}.convblock.{j}.beta                      (1, C, 1, 1)
    block{i}.lastconv.0.weight|bias                  ConvTranspose2d (.1 is PixelShuffle)

Keys of modules used only in training (`teacher`, `caltime`) or of removed refinement nets
(`contextnet`, `unet`) are ignored, as Practical-RIFE's non-strict load does; any other
unexpected key, a missing key or a wrong shape is an error naming the file and the key.

The file is read with `torch.load(weights_only=True)` (`compvis_vqgan.read_checkpoint`):
no pickled code runs. Resolved by name with `find_weights("rife_flownet.pkl")`
(``$DITHEAD_WEIGHTS``) unless a path is given: copy Practical-RIFE's
`train_log/flownet.pkl` there under that name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax.config import IFNetConfig
from dithead_jax.convert.compvis_vqgan import read_checkpoint
from dithead_jax.convert.weights import find_weights
from dithead_jax.models.ifnet import RELEASED, IFNet

RIFE_FILE = "rife_flownet.pkl"
# Modules the release may carry that inference never runs.
IGNORED_MODULES = ("teacher.", "caltime.", "contextnet.", "unet.")


def torch_key(path: tuple[Any, ...]) -> str:
    """Our parameter path (as in `nnx.state`) -> the PyTorch state_dict key."""
    parts = [str(p) for p in path]
    leaf = {"kernel": "weight", "bias": "bias", "beta": "beta"}[parts[-1]]
    if parts[0] == "encode":  # ("encode", "cnn0", "kernel")
        return f"encode.{parts[1]}.{leaf}"
    block = f"block{parts[1]}"  # ("blocks", i, ...)
    module = parts[2]
    if module == "conv0":  # each conv is the first member of a conv + LeakyReLU Sequential
        return f"{block}.conv0.{parts[3]}.0.{leaf}"
    if module == "convblock":
        if leaf == "beta":
            return f"{block}.convblock.{parts[3]}.beta"
        return f"{block}.convblock.{parts[3]}.conv.{leaf}"
    if module == "lastconv":  # ConvTranspose2d + PixelShuffle Sequential
        return f"{block}.lastconv.0.{leaf}"
    raise KeyError(f"no PyTorch name for parameter {path}")


def _is_transposed(key: str) -> bool:
    return key.startswith("encode.cnn3.") or ".lastconv." in key


def _to_ours(key: str, value: np.ndarray) -> np.ndarray:
    """PyTorch layouts -> ours: conv OIHW -> HWIO; transposed conv (I, O, kh, kw) -> the
    spatially flipped (kh, kw, I, O) of a conv over the dilated input; beta -> (C,)."""
    if key.endswith(".beta"):
        return value.reshape(-1)
    if value.ndim != 4:
        return value
    if _is_transposed(key):
        return value.transpose(2, 3, 0, 1)[::-1, ::-1]
    return value.transpose(2, 3, 1, 0)


def normalize_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without the DDP `module.` prefix, training-only modules dropped."""
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_MODULES)}


def infer_config(state: Mapping[str, Any], base: IFNetConfig = RELEASED) -> IFNetConfig:
    """The architecture of a state_dict: number of blocks and their widths, encoder width,
    residual convs per block and hidden feature channels (scales and padding from `base`,
    since the file does not store them; the release's are (16, 8, 4, 2, 1))."""
    state = normalize_state_dict(state)
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"block(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))) or "encode.cnn0.weight" not in state:
        raise ValueError(f"not an IFNet state_dict (keys like {sorted(state)[:6]})")
    widths = tuple(int(np.shape(state[f"block{i}.conv0.1.0.weight"])[0]) for i in blocks)
    res_convs = len({k.split(".")[2] for k in state if k.startswith("block0.convblock.")})
    scales = base.scales
    if len(scales) != len(blocks):  # halve per block down to 1, like the release
        scales = tuple(2 ** (len(blocks) - 1 - i) for i in blocks)
    return IFNetConfig(
        block_channels=widths,
        scales=scales,
        encoder_channels=int(np.shape(state["encode.cnn0.weight"])[0]),
        # 4 x (flow 4 + mask 1 + features) outputs before the PixelShuffle(2).
        feature_channels=int(np.shape(state["block0.lastconv.0.bias"])[0]) // 4 - 5,
        res_convs=res_convs,
        pad_multiple=max(base.pad_multiple, 4 * max(scales)),
        dtype=base.dtype,
        param_dtype=base.param_dtype,
    )


def assign_ifnet_weights(
    model: IFNet, state_dict: Mapping[str, Any], where: str = "state_dict"
) -> IFNet:
    """Write a PyTorch IFNet state_dict (tensors or arrays) into `model`, in place.
    `where` names the source (the file) in error messages."""
    state = normalize_state_dict(state_dict)
    params = nnx.state(model, nnx.Param)
    flat = {tuple(path): variable for path, variable in params.flat_state()}
    wanted = {torch_key(path): path for path in flat}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        problems = [f"missing {k}" for k in missing[:8]] + [
            f"unexpected {k}" for k in unexpected[:8]
        ]
        raise KeyError(
            f"{where}: does not match IFNet{model.config.block_channels} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys):\n  "
            + "\n  ".join(problems)
        )
    pure: dict[Any, Any] = {}
    wrong = []
    for key, path in wanted.items():
        value = _to_ours(key, _as_numpy(state[key]))
        expected = flat[path].get_value()
        if value.shape != tuple(expected.shape):
            shape = tuple(np.shape(state[key]))
            wrong.append(f"{key}: file {shape} -> {value.shape}, model wants {expected.shape}")
            continue
        node = pure
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value, expected.dtype)
    if wrong:
        raise ValueError(f"{where}: shape mismatch:\n  " + "\n  ".join(wrong))
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    return model


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def ifnet_from_state_dict(
    state_dict: Mapping[str, Any],
    config: IFNetConfig | None = None,
    where: str = "state_dict",
) -> IFNet:
    """An `IFNet` holding these weights; config None: inferred from the shapes."""
    config = config or infer_config(state_dict)
    # Abstract construction: no random weights drawn only to be overwritten.
    model = nnx.eval_shape(lambda: IFNet(config, rngs=nnx.Rngs(0)))
    return assign_ifnet_weights(model, state_dict, where)


def load_rife(path: str | Path | None = None, config: IFNetConfig | None = None) -> IFNet:
    """The released IFNet. path: Practical-RIFE's `flownet.pkl`, or None to look it up as
    `find_weights("rife_flownet.pkl")` (a miss raises FileNotFoundError naming every path
    tried). config: None = RELEASED's scales with the file's widths."""
    path = find_weights(RIFE_FILE) if path is None else Path(path)
    state = read_checkpoint(path)
    if config is None:
        config = infer_config(state)
    return ifnet_from_state_dict(state, config, where=str(path))
