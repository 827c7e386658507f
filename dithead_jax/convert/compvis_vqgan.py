"""Import CompVis latent-diffusion VQ autoencoders (`vq-f4/model.ckpt`, ...) into `VQGAN`.

A CompVis checkpoint is a PyTorch Lightning pickle whose "state_dict" holds `VQModel`'s
tensors under the names our modules mirror:

    encoder.conv_in.weight                  (O, I, 3, 3)   -> encoder/conv_in/kernel (HWIO)
    encoder.down.{i}.block.{j}.norm1.weight (C,)           -> .../norm1/scale
    encoder.down.{i}.attn.{j}.q.weight      (C, C, 1, 1)   -> .../q/kernel (1, 1, C, C)
    encoder.down.{i}.downsample.conv.*, encoder.mid.{block_1,attn_1,block_2}.*,
    encoder.norm_out.*, encoder.conv_out.*, quant_conv.*, post_quant_conv.*,
    decoder.conv_in.*, decoder.mid.*, decoder.up.{i}.block.{j}.*, decoder.up.{i}.upsample.*
    quantize.embedding.weight               (K, d)         -> quantize/codebook
plus keys we skip: `loss.*` (the taming discriminator and LPIPS the checkpoint was
trained with) and `model_ema.*` (LitEma shadows, only in use_ema runs).

The architecture is read off the tensors (`infer_config`): ch, ch_mult, num_res_blocks,
which levels have attention, z_channels, embed_dim, and the codebook size (the published
vq-f4 has 8192 codes, not the paper's 16384). What the tensors cannot tell --
GroupNorm groups (32), the nominal `resolution`, beta, dtypes -- comes from `base`.
Loading is strict: any missing or unexpected key, or a shape mismatch, is an error that
lists them all.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax.config import VQGANConfig
from dithead_jax.convert.weights import find_weights
from dithead_jax.models.vqgan import VQGAN

VQ_F4_FILE = "compvis_vq-f4.ckpt"  # resolved by `find_weights` (copy `vq-f4/model.ckpt` there)
IGNORED_PREFIXES = ("loss.", "model_ema.")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """The "state_dict" of a Lightning `.ckpt` (or a bare state_dict) as numpy arrays.

    Loads with `weights_only=True` (no arbitrary code from the pickle). Some Lightning
    checkpoints also pickle Python objects (callbacks, hyper-parameters) that this refuses;
    pass trust_pickle=True for a file from a source you trust.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (the CPU build is enough)") from e
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        if trust_pickle:
            raise
        raise RuntimeError(
            f"{path}: refused by torch.load(weights_only=True) ({e}). If you trust the file, "
            "load it with trust_pickle=True."
        ) from e
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else blob
    return {k: _as_numpy(v) for k, v in state.items() if hasattr(v, "shape")}


def _count(state: Mapping[str, Any], pattern: str) -> int:
    """1 + the largest index matched by `pattern` (one group), 0 if none."""
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def infer_config(state: Mapping[str, np.ndarray], base: VQGANConfig | None = None) -> VQGANConfig:
    """The `VQGANConfig` a CompVis state_dict was made with (see the module doc)."""
    base = VQGANConfig() if base is None else base
    try:
        conv_in = state["encoder.conv_in.weight"]
        levels = _count(state, r"encoder\.down\.(\d+)\.")
        ch = conv_in.shape[0]
        ch_mult = tuple(
            state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)
        )
        z_channels = state["encoder.conv_out.weight"].shape[0]
        embed_dim, quant_in = state["quant_conv.weight"].shape[:2]
        codebook_size = state["quantize.embedding.weight"].shape[0]
        out_channels = state["decoder.conv_out.weight"].shape[0]
    except KeyError as e:
        raise KeyError(f"not a CompVis VQModel state_dict: {e} missing") from None
    if quant_in != z_channels:
        raise ValueError(
            f"encoder outputs {z_channels} channels but quant_conv takes {quant_in}: a KL "
            "autoencoder (double_z) rather than a VQ model?"
        )
    attn_levels = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
    return dataclasses.replace(
        base,
        in_channels=conv_in.shape[1],
        out_channels=out_channels,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=_count(state, r"encoder\.down\.0\.block\.(\d+)\."),
        attn_resolutions=tuple(base.resolution // 2**i for i in attn_levels),
        mid_attention="encoder.mid.attn_1.q.weight" in state,
        z_channels=z_channels,
        embed_dim=embed_dim,
        codebook_size=codebook_size,
    )


def torch_name(path: tuple[Any, ...]) -> str:
    """Our parameter path -> its CompVis state_dict key."""
    if path == ("quantize", "codebook"):
        return "quantize.embedding.weight"
    *modules, leaf = (str(p) for p in path)
    return ".".join([*modules, _LEAF_NAMES[leaf]])


def _to_ours(name: str, value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO


def vqgan_from_state_dict(
    state: Mapping[str, Any], config: VQGANConfig | None = None, *, base: VQGANConfig | None = None
) -> VQGAN:
    """A `VQGAN` holding the tensors of a CompVis state_dict (strict; see module doc).

    config: the architecture to load into; default `infer_config(state, base)`.
    """
    state = {k: _as_numpy(v) for k, v in state.items()}
    config = infer_config(state, base) if config is None else config
    graphdef, params = nnx.split(nnx.eval_shape(lambda: VQGAN(config, rngs=nnx.Rngs(0))))
    flat = {tuple(path): var for path, var in params.flat_state()}
    names = {torch_name(path): path for path in flat}

    present = {k for k in state if not k.startswith(IGNORED_PREFIXES)}
    missing, unexpected = sorted(set(names) - present), sorted(present - set(names))
    if missing or unexpected:
        raise KeyError(
            f"state_dict does not match {config}:\n"
            f"  missing ({len(missing)}): {missing}\n  unexpected ({len(unexpected)}): {unexpected}"
        )
    pure: dict[Any, Any] = {}
    wrong_shapes = []
    for name, path in names.items():
        value = _to_ours(name, state[name])
        expected = tuple(flat[path].get_value().shape)
        if value.shape != expected:
            wrong_shapes.append(f"{name}: {state[name].shape} -> {value.shape}, want {expected}")
        node = pure
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value, flat[path].get_value().dtype)
    if wrong_shapes:
        raise ValueError("shape mismatch:\n  " + "\n  ".join(wrong_shapes))
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params)


def load_compvis_vqgan(
    path: str | Path | None = None,
    config: VQGANConfig | None = None,
    *,
    base: VQGANConfig | None = None,
    trust_pickle: bool = False,
) -> VQGAN:
    """A pretrained CompVis VQ autoencoder as our `VQGAN`; path default:
    `find_weights("compvis_vq-f4.ckpt")` (LDM's `models/first_stage_models/vq-f4/model.ckpt`)."""
    path = find_weights(VQ_F4_FILE) if path is None else Path(path)
    return vqgan_from_state_dict(read_checkpoint(path, trust_pickle), config, base=base)
