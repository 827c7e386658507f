"""Exports a trained DiT run as one self-contained folder that can move anywhere.

    python -m dithead_jax.export --workdir runs/dit --out exported/dithead   (dithead-export)

    model_index.json        components, versions, what made it; latent statistics, image
                            size, audio-feature spec, stage-1 crop/mask settings
    dit/config.json         runs.DiTSpec: model, diffusion, data
    dit/model.safetensors   EMA weights, keys "a.b.c" (nnx param paths)
    vqgan/                  the frame VQGAN (E, D): config.json (VQGANConfig), weights
    vqgan_masked/           the masked-frame VQGAN (E_m; saved whole)
    audio/wav2vec2/         a local Wav2Vec2 checkpoint, copied (a hub id stays a reference)

`sampling.load_models` / `DiTHeadPipeline.from_pretrained` read it (they detect
model_index.json). The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PROG = "dithead-export"
FORMAT = 1
INDEX = "model_index.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
COMPONENTS = ("dit", "vqgan", "vqgan_masked")
WAV2VEC2_DIR = "audio/wav2vec2"
STATISTICS = ("latent_mean", "latent_std", "masked_latent_mean", "masked_latent_std")


# ---------------------------------------------------------------------------------------
# Parameters <-> safetensors


def _key(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree: Any) -> tuple[dict[str, Any], Any]:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {_key(path): leaf for path, leaf in leaves}, treedef


def flatten_params(module: Any) -> dict[str, np.ndarray]:
    """An nnx module's Params as {"a.b.c": numpy array} (bfloat16 stored as float32:
    safetensors.numpy has no bfloat16; loading casts back to the model's dtype)."""
    from flax import nnx

    flat, _ = _flat(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    out = {}
    for key, value in flat.items():
        array = np.asarray(value)
        out[key] = array.astype(np.float32) if array.dtype.name == "bfloat16" else array
    return out


def save_params(module: Any, path: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in flatten_params(module).items()}, str(path))


def load_params(path: str | os.PathLike, make_model: Callable[[Any], Any]) -> Any:
    """The module `make_model(rngs)` builds (traced only: nothing initialised) with the
    weights of safetensors file `path`. Every key and shape must match the model's;
    otherwise ValueError naming the file."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the component's weights)")
    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    pure = nnx.to_pure_dict(params)
    expected, treedef = _flat(pure)
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: does not match its config.json: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")  # fmt: skip
    device = jax.local_devices()[0]
    arrays = []
    for key, want in expected.items():
        got = stored[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(got.shape)}, its config.json "
                             f"makes {tuple(want.shape)}")  # fmt: skip
        arrays.append(jax.device_put(jnp.asarray(got, want.dtype), device))
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, arrays))
    return nnx.merge(graphdef, params)


# ---------------------------------------------------------------------------------------
# Export


def _latest_step(workdir: Path) -> int | None:
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    return max(steps, default=None)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("dithead_jax", "jax", "flax", "orbax-checkpoint", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def _audio_spec(models: Any, tmp: Path) -> dict[str, Any]:
    """The featurizer: "logmel", or Wav2Vec2 logits with its checkpoint copied in when it
    is a local folder (else its hub id or path kept as the reference)."""
    spec = models.audio_features
    data = models.dit_run.data
    out: dict[str, Any] = {"spec": spec, "sample_rate": data.sample_rate, "fps": data.fps,
                           "audio_dim": models.dit_run.model.audio_dim,
                           "audio_window": models.dit_run.model.audio_window}  # fmt: skip
    if spec == "logmel":
        return {"name": "logmel", **out}
    reference = spec.split(":", 1)[1]
    local = Path(reference).expanduser()
    if local.is_dir():
        shutil.copytree(local, tmp / WAV2VEC2_DIR)
        return {"name": "wav2vec2", "path": WAV2VEC2_DIR, **out}
    return {"name": "wav2vec2", "reference": reference, **out}


def export(workdir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes `workdir`'s DiT run (or an exported folder, re-exported) to the new folder
    `out`; returns it. Raises FileNotFoundError / ValueError / FileExistsError."""
    from dithead_jax import __version__
    from dithead_jax.sampling import load_models

    workdir, out = Path(workdir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty")
    models = load_models(workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        configs = {
            "dit": models.dit_run.to_json(),
            "vqgan": _component_config(models, "vqgan"),
            "vqgan_masked": _component_config(models, "vqgan_masked"),
        }
        for name in COMPONENTS:
            (tmp / name).mkdir(parents=True)
            (tmp / name / CONFIG).write_text(json.dumps(configs[name], indent=1))
            save_params(getattr(models, name), tmp / name / WEIGHTS)
        latents = {k: v for k, v in models.latents.items() if k not in _PATHS}
        for key in STATISTICS:
            latents[key] = np.asarray(getattr(models, key), np.float32).tolist()
        index = {
            "_class_name": "DiTHeadPipeline",
            "format": FORMAT,
            "dithead_jax_version": __version__,
            "made_by": {
                "program": "python -m dithead_jax.export",
                "from": os.fspath(workdir.resolve()),  # a record only; never read back
                "step": _latest_step(workdir) if (workdir / "checkpoints").is_dir() else None,
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "versions": _versions(),
            },
            "components": {
                "dit": {"class": "dithead_jax.models.dit.DiT", "weights": "ema_params"},
                "vqgan": {"class": "dithead_jax.models.vqgan.VQGAN", "role": "E, D (frames)"},
                "vqgan_masked": {
                    "class": "dithead_jax.models.vqgan.VQGAN",
                    "role": "E_m (masked frames)",
                },  # fmt: skip
            },
            "image_size": int(models.image_size),
            "latents": latents,
            "audio_features": _audio_spec(models, tmp),
            "stage1": dict(models.stage1),
        }
        for name in COMPONENTS:
            index["components"][name].update(config=f"{name}/{CONFIG}",
                                              weights_file=f"{name}/{WEIGHTS}")  # fmt: skip
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        os.replace(tmp, out)  # an empty `out` is replaced; nothing half-written is seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# Machine-specific paths of the chain of runs: not part of an export.
_PATHS = ("stage1_dataset", "vqgan_workdir", "vqgan_masked_workdir", "stage1_provenance")


def _component_config(models: Any, name: str) -> dict[str, Any]:
    """A VQGAN's config: the one it was built with (models.vqgan.VQGAN keeps it)."""
    return dataclasses.asdict(getattr(models, name).config)


# ---------------------------------------------------------------------------------------
# Load


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_export(path: str | os.PathLike) -> Any:
    """The sampling.Models of an exported folder. Errors name the file at fault."""
    from dithead_jax import config as cfg
    from dithead_jax.models.dit import DiT
    from dithead_jax.models.vqgan import VQGAN
    from dithead_jax.runs import DiTSpec
    from dithead_jax.sampling import Models

    root = Path(path)
    index = _read_json(root / INDEX)
    if index.get("format") != FORMAT:
        raise ValueError(f"{root / INDEX}: format {index.get('format')!r}, this version "
                         f"reads {FORMAT}")  # fmt: skip

    def component_config(name: str, parse: Callable[[dict], Any]) -> Any:
        file = root / name / CONFIG
        try:
            return parse(_read_json(file))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and str(file) in str(e):
                raise
            raise ValueError(f"{file}: not a valid {name} config ({e})") from None

    spec = component_config("dit", DiTSpec.from_config)
    vq = {n: component_config(n, lambda d: cfg.from_dict(cfg.VQGANConfig, d, "config"))
          for n in ("vqgan", "vqgan_masked")}  # fmt: skip
    dit = load_params(root / "dit" / WEIGHTS, lambda rngs: DiT(spec.model, rngs=rngs))
    vqgans = {n: load_params(root / n / WEIGHTS, lambda rngs, c=c: VQGAN(c, rngs=rngs))
              for n, c in vq.items()}  # fmt: skip
    try:
        latents = dict(index["latents"])
        stats = {k: np.asarray(latents[k], np.float32) for k in STATISTICS}
        audio = index["audio_features"]
        image_size = int(index["image_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{root / INDEX}: incomplete ({type(e).__name__}: {e})") from None
    if "path" in audio:  # copied in: resolved against wherever the folder is now
        features = f"wav2vec2:{root / audio['path']}"
    else:
        features = audio.get("spec", "logmel")
    stage1 = dict(index.get("stage1") or {})
    latents["stage1_provenance"] = stage1
    return Models(
        dit=dit, dit_run=spec, vqgan=vqgans["vqgan"], vqgan_masked=vqgans["vqgan_masked"],
        **stats, latents=latents, stage1=stage1, audio_features=features,
        image_size=image_size, source=str(root),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    from dithead_jax.cli import fail

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="train.py workdir of the DiT (or an export)")
    p.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    args = p.parse_args(argv)
    if not Path(args.workdir).is_dir():
        fail(PROG, f"{args.workdir}: not found (a DiT workdir)")
    try:
        out = export(args.workdir, args.out)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        fail(PROG, f"cannot export {args.workdir}: {e}")
    except OSError as e:
        fail(PROG, f"cannot write {args.out}: {e}", code=1)
    print(f"exported {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
