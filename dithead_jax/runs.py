"""Trained runs for inference: the networks of a train.py workdir, and nothing else.

    dit = load_dit(workdir, config)          # EMA weights of the newest checkpoint
    vqgan = load_vqgan(workdir)              # plain weights (LDM keeps no VQGAN EMA)
    expert, spec = load_sync_expert(workdir)

A checkpoint's `state` item holds the whole TrainState (params, Adam moments, EMA, step).
Inference restores one subtree of it (`params` or `ema_params`, and for a VQGAN only the
VQGAN inside its trainer) with Orbax's partial restore: the optimizer is never built and
its moments are never read (tests/test_export.py counts the bytes TensorStore reads).
Nothing here imports `dithead_jax.training`, so sampling, evaluation and the latent
encoder do not pull in optax, Grain or the trainers.

Provenance. Stage-2 datasets record the VQGAN runs and the stage-1 dataset relative to
their own metadata folder, and a DiT run records its latents relative to its workdir
(`record_latents`), so a tree of runs and datasets moved together still loads;
`resolve_recorded` reads either form (old datasets hold absolute paths).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dithead_jax import config as cfg

CHECKPOINTS = "checkpoints"
# Written by train.py into a DiT workdir: where its stage-2 latents are, from the workdir.
PROVENANCE_FILE = "provenance.json"


@dataclasses.dataclass(frozen=True)
class DiTSpec:
    """What sampling needs from a DiT run config: the network, its noise schedule and
    prediction target, and the data settings (image size, audio window) it was trained on."""

    model: cfg.DiTConfig
    diffusion: cfg.DiffusionConfig
    data: cfg.DataConfig

    @classmethod
    def from_config(cls, config: Any) -> DiTSpec:
        get = config.get if hasattr(config, "get") else config.__getitem__
        return cls(
            model=cfg.from_dict(cfg.DiTConfig, get("model"), "config.model"),
            diffusion=cfg.from_dict(cfg.DiffusionConfig, get("diffusion"), "config.diffusion"),
            data=cfg.from_dict(cfg.DataConfig, get("data"), "config.data"),
        )

    def to_json(self) -> dict[str, Any]:
        return {k: dataclasses.asdict(getattr(self, k)) for k in ("model", "diffusion", "data")}


@dataclasses.dataclass(frozen=True)
class SyncExpertSpec:
    """What scoring needs from a sync-expert run config (image size, audio window, offsets)."""

    model: cfg.SyncExpertConfig
    data: cfg.DataConfig

    @classmethod
    def from_config(cls, config: Any) -> SyncExpertSpec:
        get = config.get if hasattr(config, "get") else config.__getitem__
        if (get("stage") or "sync_expert") != "sync_expert":
            raise ValueError(f"config.stage is {get('stage')!r}, not a sync-expert run")
        return cls(
            model=cfg.from_dict(cfg.SyncExpertConfig, get("model"), "config.model"),
            data=cfg.from_dict(cfg.DataConfig, get("data"), "config.data"),
        )


def _manager(workdir: str | os.PathLike) -> ocp.CheckpointManager:
    directory = Path(workdir) / CHECKPOINTS
    if not directory.is_dir():  # a manager would happily create it
        raise FileNotFoundError(f"{workdir}: no checkpoints folder (train.py writes it)")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(directory.resolve(), options=options)


def _step(manager: ocp.CheckpointManager, workdir: Any, step: int | None) -> int:
    steps = manager.all_steps()
    if step is None and steps:
        step = max(steps)
    if step is None or step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint{f' {step}' if step else ''} "
                                "(train.py writes them)")  # fmt: skip
    return step


def run_config(workdir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The run config saved with the newest (or `step`'s) checkpoint of `workdir`, as a
    dict. Raises FileNotFoundError when there is no checkpoint or it has no config."""
    manager = _manager(workdir)
    try:
        step = _step(manager, workdir, step)
        if not (Path(workdir) / CHECKPOINTS / str(step) / "config").is_dir():
            raise FileNotFoundError(f"{workdir}: checkpoint {step} has no run config")
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"])
    finally:
        manager.close()


def _abstract_params(make_model: Callable[[nnx.Rngs], nnx.Module]):
    """(graphdef, params of ShapeDtypeStructs on this process's first device): the model's
    structure traced, nothing computed."""
    abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params)
    return graphdef, params


def restore_params(
    workdir: str | os.PathLike,
    make_model: Callable[[nnx.Rngs], nnx.Module],
    *,
    ema: bool,
    inside: tuple[str, ...] = (),
    step: int | None = None,
) -> nnx.Module:
    """The model `make_model` builds, with the newest (or `step`'s) checkpointed weights:
    the TrainState's `ema_params` or `params`, at key path `inside` of it (a VQGAN lives at
    ("vqgan",) of its trainer). Only those arrays are read (Orbax partial restore)."""
    graphdef, abstract = _abstract_params(make_model)
    target: Any = abstract
    for key in reversed(inside):
        target = {key: target}
    target = {"ema_params" if ema else "params": target}
    manager = _manager(workdir)
    try:
        step = _step(manager, workdir, step)
        restore = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        state = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    finally:
        manager.close()
    state = state["ema_params" if ema else "params"]
    for key in inside:
        state = state[key]
    return nnx.merge(graphdef, state)


def load_dit(workdir: str | os.PathLike, config: Any, *, ema: bool = True) -> nnx.Module:
    """The DiT of the newest checkpoint in `workdir` (EMA weights by default), one device."""
    from dithead_jax.models.dit import DiT

    spec = DiTSpec.from_config(config)
    return restore_params(workdir, lambda rngs: DiT(spec.model, rngs=rngs), ema=ema)


def load_vqgan(
    workdir: str | os.PathLike, *, ema: bool = False, step: int | None = None
) -> nnx.Module:
    """The VQGAN of the newest (or `step`'s) checkpoint in `workdir`, one device; its
    config from the checkpoint. Plain weights by default: LDM's VQGANs keep no EMA, and an
    averaged codebook blurs codes that were re-seeded as dead. The discriminator is not read."""
    from dithead_jax.models.vqgan import VQGAN

    config = run_config(workdir, step)
    if config.get("stage", "vqgan") != "vqgan":
        raise ValueError(f"{workdir}: a {config.get('stage')!r} run, not a VQGAN")
    model = cfg.from_dict(cfg.VQGANConfig, config["model"], "config.model")
    return restore_params(
        workdir, lambda rngs: VQGAN(model, rngs=rngs), ema=ema, inside=("vqgan",), step=step
    )


def load_sync_expert(
    workdir: str | os.PathLike, *, ema: bool = False, step: int | None = None
) -> tuple[nnx.Module, SyncExpertSpec]:
    """The sync expert of the newest (or `step`'s) checkpoint in `workdir`, one device, and
    what its run config says about its inputs."""
    from dithead_jax.models.sync_expert import SyncExpert

    try:
        spec = SyncExpertSpec.from_config(run_config(workdir, step))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no sync-expert checkpoint: {e}") from None

    def make(rngs: nnx.Rngs) -> nnx.Module:
        return SyncExpert(spec.model, spec.data.audio_window, spec.data.audio_dim, rngs=rngs)

    return restore_params(workdir, make, ema=ema, step=step), spec


def neighbour_run(run_dir: str | os.PathLike | None, name: str) -> Path | None:
    """A run beside `run_dir` that sampling uses with it, `<run_dir>/../<name>` holding
    checkpoints (demo.py's layout: the sync expert, the frame interpolator), else None."""
    if run_dir is None:
        return None
    candidate = Path(run_dir).parent / name
    return candidate if (candidate / "checkpoints").is_dir() else None


# ---------------------------------------------------------------------------------------
# Provenance: recorded relative, resolved against where the record lives


def relative_to(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """`path` as recorded from `base` (a relative path; URLs and other drives stay whole)."""
    text = os.fspath(path)
    if "://" in text:
        return text
    try:
        return os.path.relpath(os.path.abspath(text), os.path.abspath(base))
    except ValueError:  # another drive (Windows)
        return os.path.abspath(text)


def resolve_recorded(value: str, base: str | os.PathLike) -> str:
    """A recorded path: relative ones from `base`, absolute ones and URLs as they are."""
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(os.fspath(base), value))


def record_latents(workdir: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    """Records in a local DiT workdir where its latents are, relative to the workdir."""
    if "://" in os.fspath(workdir):
        return  # a bucket run keeps its config's (URL) data.dir
    from dithead_jax.data.video_io import atomic_path

    text = json.dumps({"latents": relative_to(data_dir, workdir)}, indent=1)
    path = Path(workdir) / PROVENANCE_FILE
    if path.is_file() and path.read_text() == text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def latents_dir(workdir: str | os.PathLike, config: Any) -> str:
    """Where a DiT run's stage-2 latents are: as recorded relative to the workdir (the run
    and its datasets may have moved together), else the config's `data.dir` as given."""
    recorded = Path(workdir) / PROVENANCE_FILE
    if recorded.is_file():
        found = resolve_recorded(json.loads(recorded.read_text())["latents"], workdir)
        if os.path.isdir(found):
            return found
    return os.fspath(config["data"]["dir"])
