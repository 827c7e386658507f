"""Warm start from facebookresearch/DiT checkpoints (`DiT-XL-2-512x512.pt`, ...) into our DiT.

The released files are plain state_dicts of the class-conditional ImageNet DiT (EMA weights);
DiT's own `train.py` saves {"model", "ema", "opt", "args"}, from which the EMA is taken.
Their tensors map onto ours as follows (D width, p patch, H heads, c their latent channels,
4 for SD-VAE; C ours, 3 for our VQGAN):

    x_embedder.proj.weight (D, c, p, p)     -> patch_embed/proj/kernel (p, p, 3C, D): their
        first min(c, C) channels fill the z_t slot; the z_masked and z_reference slots (and
        z_t channels >= c) start at zero, as latent-inpainting models widen their input
    t_embedder.mlp.{0,2}.*                  -> t_embedder/fc{1,2}
    blocks.i.attn.qkv.weight (3D, D)        -> blocks/i/attn/qkv/kernel (D, 3, H, D/H)
    blocks.i.attn.proj.weight (D, D)        -> blocks/i/attn/out/kernel (H, D/H, D)
    blocks.i.mlp.fc{1,2}.*, blocks.i.adaLN_modulation.1.* -> blocks/i/mlp/fc{1,2}, modulation
    final_layer.adaLN_modulation.1.*        -> final_layer/modulation
    final_layer.linear.weight (p*p*c', D)   -> final_layer/proj/kernel (D, p*p*C'): per output
        pixel (row, col, channel), our epsilon channels take their first min(c, C) epsilon
        channels, and with learn_sigma on both sides our variance channels theirs; the rest
        stay zero (their fresh value)
    pos_embed                               -> nothing: our positions are the same fixed
        sin-cos table, computed; the file's is checked against it (and so is its grid)
    y_embedder.embedding_table.weight       -> dropped (no classes here)

Cross-attention, the audio context embedder, the null audio and the landmark embedder are
new and keep the model's fresh initialisation; the cross-attention output projection starts
at zero, so an imported model computes exactly the class-free DiT of the file on the z_t
channels until training moves it. With scan_layers=True the blocks are stacked.

The number of heads is not stored in a state_dict: it is checked against the published
variant of the same depth and width, or against `args.model` of a training checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dithead_jax.config import DiTConfig
from dithead_jax.convert.weights import find_weights
from dithead_jax.models.dit import DiT
from dithead_jax.models.layers import sincos_2d

# Keys of the file that have no counterpart here (see the module doc).
DROPPED_KEYS = ("y_embedder.embedding_table.weight", "pos_embed")
PUBLISHED_SIZES = ("S", "B", "L", "XL")  # facebookresearch/DiT's DiT-{S,B,L,XL}/{2,4,8}
_POSITION_TOLERANCE = 1e-4  # the file's table was computed in float64, stored in float32


@dataclasses.dataclass(frozen=True)
class DiTImport:
    """What a checkpoint gives our DiT.

    params: pure-dict tree (numpy) of every parameter the file determines, in the config's
      layout (blocks stacked under scan_layers); the others are absent.
    loaded / new: our parameter names filled from the file / keeping their fresh init
      (block parameters once, as blocks/*/...).
    notes: how channels and unchecked sizes were handled, for the log.
    """

    source: str
    params: dict
    loaded: tuple[str, ...]
    new: tuple[str, ...]
    notes: tuple[str, ...]

    def summary(self) -> str:
        lines = [f"init_from {self.source}: {len(self.loaded)} parameters loaded, "
                 f"{len(self.new)} new"]  # fmt: skip
        lines.append("  loaded: " + ", ".join(self.loaded))
        lines.append("  new (fresh init): " + (", ".join(self.new) or "none"))
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, np.float32)


def read_dit_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], str | None]:
    """(state_dict as float32 numpy, model name like "DiT-XL/2" or None) of a DiT file.

    Loaded with `weights_only=True`: tensors and plain containers only, plus argparse's
    Namespace (an attribute bag) for the "args" of DiT's training checkpoints.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (the CPU build is enough)") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DiT checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a loadable PyTorch checkpoint ({first})") from None
    if not isinstance(blob, Mapping):
        raise ValueError(f"{path}: holds a {type(blob).__name__}, not a DiT state_dict")
    model_name = None
    if "ema" in blob or "model" in blob:  # DiT's train.py: prefer the EMA, as its sampler does
        args = blob.get("args")
        model_name = getattr(args, "model", None) if args is not None else None
        blob = blob["ema"] if "ema" in blob else blob["model"]
    state = {k: _as_numpy(v) for k, v in blob.items() if hasattr(v, "shape")}
    if "x_embedder.proj.weight" not in state:
        raise ValueError(f"{path}: not a facebookresearch/DiT state_dict (no x_embedder)")
    return state, model_name


@dataclasses.dataclass(frozen=True)
class _FileShape:
    """The architecture a state_dict was made with, as far as its tensors tell."""

    depth: int
    width: int
    patch: int
    channels: int  # latent channels in
    learn_sigma: bool
    mlp_width: int
    grid: int


def _file_shape(state: Mapping[str, np.ndarray], where: str) -> _FileShape:
    try:
        width, channels, patch, _ = state["x_embedder.proj.weight"].shape
        outputs = state["final_layer.linear.weight"].shape[0] // patch**2
        mlp_width = state["blocks.0.mlp.fc1.weight"].shape[0]
        tokens = state["pos_embed"].shape[-2]
    except KeyError as e:
        raise ValueError(f"{where}: not a DiT state_dict ({e.args[0]} missing)") from None
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    grid = round(tokens**0.5)
    if outputs not in (channels, 2 * channels) or grid * grid != tokens:
        raise ValueError(f"{where}: {outputs} outputs for {channels} channels, {tokens} tokens")
    return _FileShape(len(indices), width, patch, channels, outputs == 2 * channels, mlp_width,
                      grid)  # fmt: skip


def _expected_heads(shape: _FileShape, model_name: str | None) -> int | None:
    """Heads of the published variant: by the checkpoint's args, else by depth and width."""
    if model_name:
        m = re.fullmatch(r"DiT-(S|B|L|XL)/(\d+)", model_name)
        if m:
            return DiTConfig.named(f"{m.group(1)}_{m.group(2)}").num_heads
    for size in PUBLISHED_SIZES:
        ref = DiTConfig.named(f"{size}_2")
        if (ref.depth, ref.hidden_size) == (shape.depth, shape.width):
            return ref.num_heads
    return None


def _check_sizes(shape: _FileShape, config: DiTConfig, model_name: str | None, where: str):
    grid = config.input_size // config.patch_size
    sizes = {
        "depth": (shape.depth, config.depth),
        "hidden_size": (shape.width, config.hidden_size),
        "patch_size": (shape.patch, config.patch_size),
        "MLP width": (shape.mlp_width, int(config.hidden_size * config.mlp_ratio)),
        "token grid": (shape.grid, grid),
    }
    differ = [f"{n} {t} in the file, {o} here" for n, (t, o) in sizes.items() if t != o]
    heads = _expected_heads(shape, model_name)
    if heads is not None and heads != config.num_heads:
        differ.append(f"num_heads {heads} in the file's variant, {config.num_heads} here")
    if differ:
        hint = ""
        if shape.grid != grid:
            hint = (f" (input_size {shape.grid * shape.patch} latents; the 512x512 release "
                    "has a 32x32 grid of 64x64 latents, the 256x256 one 16x16)")  # fmt: skip
        raise ValueError(f"{where}: DiT does not match the config: {'; '.join(differ)}{hint}")
    return heads


def _linear(state: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """torch Linear (out, in) -> our kernel (in, out) and bias."""
    return {"kernel": state[f"{name}.weight"].T, "bias": state[f"{name}.bias"]}


def _block(state: Mapping[str, np.ndarray], i: int, heads: int) -> dict:
    prefix = f"blocks.{i}"
    d = state[f"{prefix}.attn.proj.weight"].shape[0]
    qkv = _linear(state, f"{prefix}.attn.qkv")
    out = _linear(state, f"{prefix}.attn.proj")
    # timm splits the fused output as (3, heads, head_dim), the same order as our kernel's.
    return {
        "attn": {
            "qkv": {"kernel": qkv["kernel"].reshape(d, 3, heads, d // heads),
                    "bias": qkv["bias"].reshape(3, heads, d // heads)},
            "out": {"kernel": out["kernel"].reshape(heads, d // heads, d), "bias": out["bias"]},
        },
        "mlp": {"fc1": _linear(state, f"{prefix}.mlp.fc1"),
                "fc2": _linear(state, f"{prefix}.mlp.fc2")},
        "modulation": _linear(state, f"{prefix}.adaLN_modulation.1"),
    }  # fmt: skip


def _patch_embed(state: Mapping[str, np.ndarray], c: int, shared: int) -> dict[str, np.ndarray]:
    weight = state["x_embedder.proj.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
    kernel = np.zeros((*weight.shape[:2], 3 * c, weight.shape[3]), np.float32)
    kernel[:, :, :shared] = weight[:, :, :shared]  # the z_t slot is the first C channels
    return {"kernel": kernel, "bias": state["x_embedder.proj.bias"]}


def _final_proj(
    state: Mapping[str, np.ndarray], shape: _FileShape, config: DiTConfig, shared: int
) -> dict[str, np.ndarray]:
    p, c, theirs = shape.patch, config.latent_channels, shape.channels
    ours = c * (2 if config.learn_sigma else 1)
    weight = state["final_layer.linear.weight"].reshape(p, p, -1, shape.width)
    bias = state["final_layer.linear.bias"].reshape(p, p, -1)
    new_w = np.zeros((p, p, ours, shape.width), np.float32)
    new_b = np.zeros((p, p, ours), np.float32)
    pairs = [(0, 0)]  # (our first channel, theirs) of each half
    if config.learn_sigma and shape.learn_sigma:
        pairs.append((c, theirs))
    for dst, src in pairs:
        new_w[:, :, dst : dst + shared] = weight[:, :, src : src + shared]
        new_b[:, :, dst : dst + shared] = bias[:, :, src : src + shared]
    return {"kernel": new_w.reshape(p * p * ours, shape.width).T, "bias": new_b.reshape(-1)}


def _span(start: int, stop: int) -> str:
    return str(start) if stop == start + 1 else f"{start}..{stop - 1}"


def _flat(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flat(value, (*prefix, key))
        else:
            out[(*prefix, key)] = value
    return out


def _display(path: tuple) -> str:
    """Block parameters once, as blocks/*/..., in either layout."""
    parts = [str(p) for p in path]
    if parts[0] == "blocks":
        parts = ["blocks", "*", *(parts[2:] if parts[1].isdigit() else parts[1:])]
    return "/".join(parts)


def import_state_dict(
    state: Mapping[str, np.ndarray],
    config: DiTConfig,
    *,
    source: str = "state_dict",
    model_name: str | None = None,
) -> DiTImport:
    """Maps a facebookresearch/DiT state_dict onto `config`'s DiT (see the module doc);
    one-line ValueError naming `source` on any mismatch."""
    shape = _file_shape(state, source)
    heads = _check_sizes(shape, config, model_name, source)
    expected = {"x_embedder.proj.weight", "x_embedder.proj.bias", *DROPPED_KEYS}
    expected |= {f"t_embedder.mlp.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")}
    expected |= {f"final_layer.{m}.{leaf}" for m in ("linear", "adaLN_modulation.1")
                 for leaf in ("weight", "bias")}  # fmt: skip
    for i in range(shape.depth):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    missing = sorted(expected - set(state) - {DROPPED_KEYS[0]})  # a class-free DiT is fine
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: not a facebookresearch/DiT state_dict: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''}"
        )
    table = sincos_2d(shape.width, shape.grid)
    if not np.allclose(state["pos_embed"].reshape(table.shape), table, atol=_POSITION_TOLERANCE):
        raise ValueError(f"{source}: pos_embed is not DiT's fixed 2-D sin-cos table")

    shared = min(shape.channels, config.latent_channels)
    heads = config.num_heads if heads is None else heads
    blocks = {i: _block(state, i, heads) for i in range(shape.depth)}
    if config.scan_layers:
        blocks = jax.tree.map(lambda *layers: np.stack(layers), *blocks.values())
    params = {
        "patch_embed": {"proj": _patch_embed(state, config.latent_channels, shared)},
        "t_embedder": {"fc1": _linear(state, "t_embedder.mlp.0"),
                       "fc2": _linear(state, "t_embedder.mlp.2")},
        "blocks": blocks,
        "final_layer": {"modulation": _linear(state, "final_layer.adaLN_modulation.1"),
                        "proj": _final_proj(state, shape, config, shared)},
    }  # fmt: skip

    model = nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))
    ours = {tuple(path): var.get_value() for path, var in nnx.state(model, nnx.Param).flat_state()}
    loaded = _flat(params)
    wrong = [f"{'/'.join(map(str, k))} {v.shape} vs {ours[k].shape}"
             for k, v in loaded.items() if k not in ours or v.shape != ours[k].shape]  # fmt: skip
    if wrong:  # a bug here or a config option this importer does not know
        raise ValueError(f"{source}: mapped tensors do not fit the model: {wrong[:3]}")

    c, theirs = config.latent_channels, shape.channels
    notes = [
        f"patch embedding: the file's latent channels {_span(0, shared)} -> z_t "
        f"{_span(0, shared)}; z_masked, z_reference"
        + (f", z_t {_span(shared, c)}" if shared < c else "") + " start at zero",
        f"output: epsilon channels {_span(0, shared)} from the file's"
        + (", variance likewise" if config.learn_sigma and shape.learn_sigma else "")
        + (f"; channels {_span(shared, c)} start at zero" if shared < c else ""),
    ]  # fmt: skip
    if theirs > shared:
        notes.append(f"the file's latent channels {_span(shared, theirs)} are dropped")
    if shape.learn_sigma != config.learn_sigma:
        sigma = "ours starts at zero (none in the file)" if config.learn_sigma else "dropped"
        notes.append(f"variance output: {sigma}")
    if DROPPED_KEYS[0] in state:
        notes.append("class embedding (y_embedder) dropped: conditioning is t (+ audio) here")
    if _expected_heads(shape, model_name) is None:
        notes.append(f"num_heads is not stored in the file: {config.num_heads} (the config's)")
    return DiTImport(
        source=source,
        params=params,
        loaded=tuple(dict.fromkeys(_display(k) for k in ours if k in loaded)),
        new=tuple(dict.fromkeys(_display(k) for k in ours if k not in loaded)),
        notes=tuple(notes),
    )


def load_dit_weights(path: str | Path, config: DiTConfig) -> DiTImport:
    """`import_state_dict` of the checkpoint at `path`: a file, or else a name that
    `find_weights` resolves (e.g. "DiT-XL-2-512x512.pt" in $DITHEAD_WEIGHTS)."""
    path = Path(path)
    if not path.is_file():
        path = find_weights(str(path))  # FileNotFoundError naming every place it looked
    state, model_name = read_dit_checkpoint(path)
    return import_state_dict(state, config, source=str(path), model_name=model_name)


def apply_import(params: nnx.State, imported: DiTImport) -> nnx.State:
    """A copy of `params` (an nnx.State of arrays) whose imported leaves are replaced, each
    placed with the sharding of the array it replaces (so it works on any mesh, multi-host
    included: each process builds only its own shards)."""
    values = _flat(imported.params)
    out = jax.tree.map(lambda x: x, params)  # a new State over the same (untouched) arrays

    def put(old: jax.Array, value: np.ndarray) -> jax.Array:
        value = np.asarray(value, old.dtype)
        return jax.make_array_from_callback(old.shape, old.sharding, lambda index: value[index])

    replacements = {}
    for path, var in out.flat_state():
        key = tuple(path)
        if key in values:
            replacements[key] = put(var.get_value(), values[key])
    nested: dict = {}
    for key, value in replacements.items():
        node = nested
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    nnx.replace_by_pure_dict(out, nested)
    return out


def load_dit(path: str | Path, config: DiTConfig, *, seed: int = 0) -> tuple[DiT, DiTImport]:
    """A DiT of `config` (fresh init from `seed`) holding the file's weights, on one device."""
    imported = load_dit_weights(path, config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(seed))))
    # Jitted: an eager init would compile its ~50 ops one by one.
    fresh = jax.jit(lambda: nnx.state(DiT(config, rngs=nnx.Rngs(seed)), nnx.Param))()
    return nnx.merge(graphdef, apply_import(fresh, imported)), imported
