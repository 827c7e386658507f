"""Hugging Face Wav2Vec2ForCTC checkpoints -> our Flax NNX `Wav2Vec2ForCTC`.

Reads a local directory (as written by `save_pretrained`) or a hub id, which goes through
`huggingface_hub.snapshot_download` (works where there is internet or a warm cache). The
weights come from `model.safetensors` (sharded or not; read with `safetensors.numpy`, no
torch) or else from `pytorch_model.bin` (torch is imported only on that path).

The mapping is strict: every checkpoint key must land on a parameter and every parameter
must be filled, with matching shapes, or loading fails naming the offending keys. Known
training-only tensors (`masked_spec_embed`, the SpecAugment vector) are the sole exception.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dithead_jax.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2ForCTC

log = logging.getLogger(__name__)

ParamPath = tuple[str | int, ...]

_PREFIX = "wav2vec2."
# Present in every checkpoint trained with SpecAugment; inference never reads it.
_IGNORED_KEYS = frozenset({"wav2vec2.masked_spec_embed"})
_POS_CONV = "wav2vec2.encoder.pos_conv_embed.conv."
# The two layouts PyTorch has used for the weight-normalised positional conv:
# legacy `torch.nn.utils.weight_norm` and `torch.nn.utils.parametrizations.weight_norm`.
_WEIGHT_NORM_KEYS = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)
_CHECKPOINT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class Wav2Vec2CheckpointError(ValueError):
    """A checkpoint that does not fit the model (missing/extra keys, shapes, files)."""


# --------------------------------------------------------------------------- key mapping


def fold_weight_norm(g: np.ndarray, v: np.ndarray, dim: int = 2) -> np.ndarray:
    """PyTorch weight norm w = g * v / ||v||, the norm taken over every axis except `dim`.

    HF applies it with dim=2 (the kernel axis): g is (1, 1, K), v is (out, in/groups, K).
    Folded in float64 so the plain kernel is as exact as float32 allows.
    """
    v64 = v.astype(np.float64)
    axes = tuple(a for a in range(v.ndim) if a != dim)
    norm = np.sqrt(np.sum(v64 * v64, axis=axes, keepdims=True))
    return (g.astype(np.float64) * v64 / norm).astype(np.float32)


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Checkpoint keys in one canonical spelling, as float32 numpy arrays.

    Adds the `wav2vec2.` prefix a bare `Wav2Vec2Model` checkpoint lacks, renames the
    pre-2020 `gamma`/`beta` LayerNorm names as transformers does, and folds weight norm.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not key.startswith(_PREFIX) and not key.startswith("lm_head."):
            key = _PREFIX + key
        key = re.sub(r"\.gamma$", ".weight", key)
        key = re.sub(r"\.beta$", ".bias", key)
        out[key] = np.asarray(value, dtype=np.float32)
    for g_name, v_name in _WEIGHT_NORM_KEYS:
        g_key, v_key = _POS_CONV + g_name, _POS_CONV + v_name
        if g_key in out and v_key in out:
            if _POS_CONV + "weight" in out:
                raise Wav2Vec2CheckpointError(
                    "positional conv has both a plain weight and weight-norm factors"
                )
            out[_POS_CONV + "weight"] = fold_weight_norm(out.pop(g_key), out.pop(v_key))
    return out


def _param_path(key: str, ndim: int) -> ParamPath:
    """'wav2vec2.encoder.layers.0.attention.q_proj.weight' -> (..., 'layers', 0, ..., 'kernel').

    Our attribute names mirror PyTorch's; only the leaf names differ: Linear/Conv `weight` is
    flax `kernel`, a norm's `weight` (1-D) is flax `scale`.
    """
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    if parts[-1] == "weight":
        parts[-1] = "kernel" if ndim >= 2 else "scale"
    return tuple(parts)


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
    """PyTorch Linear (out, in) -> (in, out); Conv1d (out, in/groups, k) -> (k, in/groups, out)."""
    if value.ndim == 2:
        return value.T
    if value.ndim == 3:
        return value.transpose(2, 1, 0)
    return value


def _format_keys(keys: set[Any], limit: int = 8) -> str:
    shown = sorted(".".join(map(str, k)) if isinstance(k, tuple) else k for k in keys)
    more = f" (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def wav2vec2_from_state_dict(
    state_dict: Mapping[str, Any], config: Wav2Vec2Config, *, dtype: Any = None
) -> Wav2Vec2ForCTC:
    """Builds our model from a PyTorch-layout `Wav2Vec2ForCTC` state dict (name -> array).

    Raises `Wav2Vec2CheckpointError` naming any unused checkpoint key, any parameter left
    unfilled, or any shape mismatch. No random initialisation happens: the module is built
    abstractly and receives the checkpoint's arrays directly.
    """
    converted: dict[ParamPath, np.ndarray] = {}
    source_key: dict[ParamPath, str] = {}  # errors name the checkpoint's own spelling
    for key, value in _normalise_keys(state_dict).items():
        if key in _IGNORED_KEYS:
            continue
        path = _param_path(key, value.ndim)
        converted[path] = _to_flax_layout(value)
        source_key[path] = key

    abstract = nnx.eval_shape(lambda: Wav2Vec2ForCTC(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))

    unused = set(converted) - set(flat)
    missing = set(flat) - set(converted)
    if unused or missing:
        problems = []
        if unused:
            unused_keys = {source_key[p] for p in unused}
            problems.append(f"unexpected checkpoint keys: {_format_keys(unused_keys)}")
        if missing:
            problems.append(f"parameters missing from checkpoint: {_format_keys(missing)}")
        raise Wav2Vec2CheckpointError(
            "Wav2Vec2 checkpoint does not match the config; " + "; ".join(problems)
        )

    for path, variable in flat.items():
        value = converted[path]
        if value.shape != variable.shape:
            raise Wav2Vec2CheckpointError(
                f"shape mismatch at {'.'.join(map(str, path))} ({source_key[path]}): checkpoint "
                f"{value.shape} (after transpose) vs model {variable.shape}"
            )
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --------------------------------------------------------------------------- files


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in `directory`, safetensors preferred over .bin."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        from safetensors.numpy import load_file

        files = [single] if single.is_file() else _shards(index)
        weights: dict[str, np.ndarray] = {}
        for file in files:
            weights.update(load_file(file))
        return weights

    single, index = directory / "pytorch_model.bin", directory / "pytorch_model.bin.index.json"
    if single.is_file() or index.is_file():
        try:
            import torch  # only this legacy format needs it
        except ImportError as e:
            raise Wav2Vec2CheckpointError(
                f"{directory} only has pytorch_model.bin, which needs torch to read; "
                "install torch (CPU is enough) or convert the checkpoint to safetensors"
            ) from e
        files = [single] if single.is_file() else _shards(index)
        weights = {}
        for file in files:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
            weights.update({k: v.float().numpy() for k, v in tensors.items()})
        return weights

    raise Wav2Vec2CheckpointError(
        f"no Wav2Vec2 weights in {directory}: expected one of {', '.join(_CHECKPOINT_FILES)}"
    )


def _shards(index_file: Path) -> list[Path]:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    return [index_file.parent / name for name in sorted(set(weight_map.values()))]


def _resolve(path_or_hub_id: str | os.PathLike[str], revision: str | None) -> Path:
    """A local checkpoint directory: the argument itself, or a hub snapshot of it."""
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        return local
    name = str(path_or_hub_id)
    # Anything that cannot be a hub id ("owner/name" or "name") is a mistyped local path.
    if local.is_absolute() or name.startswith(".") or name.count("/") > 1:
        raise FileNotFoundError(f"Wav2Vec2 checkpoint directory not found: {name}")

    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
        except Exception as e:  # offline, unknown repo, auth, network: all end the same way
            reason = " ".join(str(e).split())[:300]
            raise FileNotFoundError(
                f"Wav2Vec2 checkpoint {name!r} is not a local directory and could not be "
                f"fetched from the Hugging Face Hub ({type(e).__name__}: {reason})"
            ) from e

    # Config and safetensors first; the .bin (same size again) only if there are none.
    directory = fetch(["config.json", "preprocessor_config.json", "model*.safetensors*"])
    if not any((directory / f).is_file() for f in _CHECKPOINT_FILES):
        directory = fetch(["pytorch_model*.bin*"])
    return directory


def load_wav2vec2(
    path_or_hub_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: Any = None,
) -> tuple[Wav2Vec2ForCTC, Wav2Vec2Config, Any]:
    """Loads an HF `Wav2Vec2ForCTC` checkpoint (local directory or hub id).

    Returns (model, config, feature_extractor): our NNX model with the checkpoint's weights;
    our `Wav2Vec2Config` (built from `transformers.Wav2Vec2Config`); and the checkpoint's
    `transformers.Wav2Vec2FeatureExtractor`, which turns 16 kHz audio into the model's
    `input_values` (`fe(audio, sampling_rate=16000, return_tensors="np").input_values`).
    A checkpoint without `preprocessor_config.json` gets the default extractor (zero-mean /
    unit-variance normalisation), with a warning. `dtype` is the compute dtype.
    """
    import transformers

    directory = _resolve(path_or_hub_id, revision)
    hf_config = transformers.Wav2Vec2Config.from_pretrained(directory)
    config = Wav2Vec2Config.from_hf(hf_config)
    if (directory / "preprocessor_config.json").is_file():
        feature_extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(directory)
    else:
        log.warning("%s has no preprocessor_config.json; using the default extractor", directory)
        feature_extractor = transformers.Wav2Vec2FeatureExtractor(
            do_normalize=True, return_attention_mask=config.feat_extract_norm == "layer"
        )
    model = wav2vec2_from_state_dict(_read_weights(directory), config, dtype=dtype)
    return model, config, feature_extractor


__all__ = [
    "Wav2Vec2CheckpointError",
    "fold_weight_norm",
    "load_wav2vec2",
    "wav2vec2_from_state_dict",
]
