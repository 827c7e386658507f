"""The frame interpolator's training (RIFE's IFNet, stage 3), assembled like
`sync_expert_train.py`: config -> mesh -> frame triplets -> sharded state -> step -> the
shared loop (Orbax checkpoints, TensorBoard, resume).

Self-supervised on our own videos: of three frames (p, p+j, p+n) of a stage-1 clip the
outer two go in, the middle one is the answer at t = j / n (`data/vfi_triplets.py`). The
objective is RIFE's reconstruction loss, the L1 distance between Laplacian pyramids
(`LapLoss`: 5 band-pass levels of a 5x5 binomial blur) of the final frame and the true one;
comparing band by band weighs edges at every scale instead of letting flat skin dominate a
plain L1. RIFE adds a privileged-distillation term (a teacher IFBlock that also sees the
answer, whose flow the student blocks regress to); it needs a block our IFNet does not
have and is left out. Its stand-in, `loss.block_weight`, puts the same LapLoss on the
earlier blocks' merged frames (0 = RIFE's final-frame-only loss).

`init_weights` (a released Practical-RIFE `flownet.pkl`, by name in the weights directory
or by path, through `convert/rife_weights.py`) starts a fresh run from those weights: the
`hdtf` config fine-tunes them at a low rate. A resumed run keeps its checkpoint's.

    python train.py --config configs/vfi.py:demo --workdir W --config.data.dir=STAGE1
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from dithead_jax import config as cfg
from dithead_jax import sharding
from dithead_jax.models.ifnet import IFNet
from dithead_jax.models.layers import count_params
from dithead_jax.training import loop
from dithead_jax.training.dit_step import FAST_COMPILE_CPU
from dithead_jax.training.state import (
    StateSetup,
    TrainState,
    abstract_train_state,
    create_train_state,
    make_optimizer,
    supervised_step,
)

Array = jax.Array
Batch = Mapping[str, Array]
BATCH_KEYS = ("img0", "gt", "img1", "timestep")
RULES = sharding.VQGAN_RULES  # a conv net: the VQGANs' rule set


@dataclasses.dataclass(frozen=True)
class VFIRun:
    """The typed view of a `configs/vfi.py` run config (or its saved dict)."""

    model: cfg.IFNetConfig
    loss: cfg.VFILossConfig
    triplets: cfg.TripletConfig
    train: cfg.TrainConfig
    mesh: cfg.MeshConfig
    data: cfg.DataConfig
    # A released flownet.pkl (name in the weights directory, or a path) for a fresh run.
    init_weights: str = ""

    @classmethod
    def from_config(cls, config: Any) -> VFIRun:
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        if get("stage", "vfi") != "vfi":
            raise ValueError(f"config.stage is {get('stage')!r}; this trainer runs 'vfi'")
        run = cls(
            model=cfg.from_dict(cfg.IFNetConfig, config["model"], "config.model"),
            loss=cfg.from_dict(cfg.VFILossConfig, config["loss"], "config.loss"),
            triplets=cfg.from_dict(cfg.TripletConfig, config["triplets"], "config.triplets"),
            train=cfg.from_dict(cfg.TrainConfig, config["train"], "config.train"),
            mesh=sharding.mesh_config(config["mesh"]),
            data=cfg.from_dict(cfg.DataConfig, config["data"], "config.data"),
            init_weights=str(get("init_weights", "") or ""),
        )
        if run.triplets.crop > run.data.image_size:
            raise cfg.ConfigError(
                "config.triplets.crop",
                f"is {run.triplets.crop}, larger than data.image_size {run.data.image_size}",
            )
        return run

    @property
    def frame_size(self) -> int:
        """The side of the training frames (a crop, or whole frames)."""
        return self.triplets.crop or self.data.image_size

    def make_model(self, rngs: nnx.Rngs) -> IFNet:
        return IFNet(self.model, rngs=rngs)


# ---------------------------------------------------------------------------------------
# RIFE's reconstruction loss


def _blur_axis(x: Array, axis: int) -> Array:
    """The (1 4 6 4 1) / 16 binomial filter along `axis`, reflect-padded by 2: five shifted
    slices added (XLA:CPU runs depthwise convolutions several times slower than this)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    xp = jnp.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    taps = (1.0, 4.0, 6.0, 4.0, 1.0)
    total = sum(w * jax.lax.slice_in_dim(xp, k, k + n, axis=axis) for k, w in enumerate(taps))
    return total / 16.0


def _binomial_blur(x: Array) -> Array:
    """(B, H, W, C) -> same: RIFE's 5x5 binomial kernel (1 4 6 4 1)^2 / 256, reflect-padded
    (`conv_gauss`), as the two 1-D passes it factors into."""
    return _blur_axis(_blur_axis(x, 1), 2)


def laplacian_pyramid(x: Array, levels: int) -> list[Array]:
    """(B, H, W, C) -> `levels` band-pass images (B, H / 2^k, W / 2^k, C), finest first:
    RIFE's `laplacian_pyramid` (blur, keep every other pixel, zero-insert back up, blur x 4,
    subtract). The low-pass residual is not a level, as in RIFE."""
    pyramid = []
    current = x
    for _ in range(levels):
        down = _binomial_blur(current)[:, ::2, ::2]
        b, h, w, c = down.shape
        up = jnp.zeros((b, 2 * h, 2 * w, c), x.dtype).at[:, ::2, ::2].set(down)
        up = 4.0 * _binomial_blur(up)[:, : current.shape[1], : current.shape[2]]
        pyramid.append(current - up)
        current = down
    return pyramid


def lap_loss(prediction: Array, target: Array, levels: int = 5) -> Array:
    """RIFE's `LapLoss`: sum over levels of the mean |difference| of the two pyramids.
    The pyramid is linear, so it is built once, of the difference."""
    return sum(jnp.mean(jnp.abs(band)) for band in laplacian_pyramid(prediction - target, levels))


def psnr(prediction: Array, target: Array) -> Array:
    """(B,) PSNR in dB of images in [0, 1] (prediction clipped to that range)."""
    mse = jnp.mean((jnp.clip(prediction, 0.0, 1.0) - target) ** 2, axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def vfi_loss(
    outputs: Mapping[str, Any], target: Array, loss: cfg.VFILossConfig
) -> tuple[Array, dict[str, Array]]:
    """(loss, metrics) of `IFNet.estimate`'s outputs against the true middle frame."""
    final = lap_loss(outputs["frame"], target, loss.lap_levels)
    metrics = {"lap_final": final, "psnr": jnp.mean(psnr(outputs["frame"], target))}
    total = final
    earlier = list(outputs["merged"])[:-1]  # the last block's merged frame is the final one
    if earlier:
        blocks = sum(lap_loss(m, target, loss.lap_levels) for m in earlier) / len(earlier)
        metrics["lap_blocks"] = blocks
        if loss.block_weight:
            total = total + loss.block_weight * blocks
    return total, metrics


# ---------------------------------------------------------------------------------------
# The step


def _interpolate(model: IFNet, batch: Batch) -> dict[str, Any]:
    return model.estimate(batch["img0"], batch["img1"], batch["timestep"])


def make_train_step(
    setup: StateSetup, run: VFIRun
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """The un-jitted step: (state, global batch) -> (new state, metrics); a non-finite loss,
    gradient or update leaves the state untouched (`state.guard_update`)."""

    def loss_of(model: IFNet, batch: Batch) -> tuple[Array, dict[str, Array]]:
        return vfi_loss(_interpolate(model, batch), batch["gt"], run.loss)

    return supervised_step(setup, run.train, loss_of)


# ---------------------------------------------------------------------------------------
# Assembly


def triplet_batches(
    run: VFIRun,
    rows: tuple[int, int] | None = None,
    *,
    split: str = "train",
    shuffle: bool = True,
    augment: bool = True,
    num_epochs: int | None = None,
    seed_offset: int = 0,
) -> Iterator:
    """This process's rows of each global batch of triplets (a grain iterator). Without
    `augment`: whole frames, spans (2,) only (every (p, p+1, p+2) at t = 0.5), no flips."""
    from dithead_jax.data.vfi_triplets import triplet_dataset  # TFDS: only when read

    if not run.data.dir:
        raise ValueError("--config.data.dir must name stage-1 frame records")
    t = run.triplets
    return iter(
        triplet_dataset(
            run.data.dir,
            split,
            batch_size=run.train.global_batch_size,
            seed=run.train.seed + seed_offset,
            spans=t.spans if augment else (2,),
            crop=t.crop if augment else 0,
            random_flip=t.random_flip and augment,
            random_reverse=t.random_reverse and augment,
            shuffle=shuffle,
            num_epochs=num_epochs,
            host_rows=rows,
        )
    )


def read_init_weights(run: VFIRun) -> nnx.State | None:
    """The Params of `run.init_weights` (None without): a released flownet.pkl, by path or
    by name in the weights directory (`convert.weights.find_weights`, whose miss names
    every path it tried), read by the importer into `run.model`'s layout."""
    if not run.init_weights:
        return None
    from pathlib import Path

    from dithead_jax.convert import rife_weights
    from dithead_jax.convert.weights import find_weights

    path = Path(run.init_weights).expanduser()
    if not path.is_file():
        path = find_weights(run.init_weights)
    try:
        imported = rife_weights.load_rife(path, run.model)
    except (KeyError, ValueError) as e:  # a file that does not fit config.model: one line
        message = str(e.args[0]) if e.args else str(e)
        raise ValueError(message.replace(":\n  ", ": ").replace("\n  ", "; ")) from None
    logging.info("IFNet initialised from %s", path)
    return nnx.split(imported, nnx.Param)[1]


def with_weights(params: nnx.State, imported: nnx.State) -> nnx.State:
    """`params` (sharded) holding `imported`'s values (the same tree: one IFNetConfig)."""
    return jax.tree.map(
        lambda old, new: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
        params,
        imported,
    )


def build_task(
    config: Any,
    *,
    batches: Iterator[Mapping[str, np.ndarray]] | None = None,
    preview_batch: Mapping[str, np.ndarray] | None = None,
    devices: list | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> loop.Task:
    """Everything the loop needs for an interpolator run; `batches` / `preview_batch`
    default to the triplets of `config.data.dir`'s training split (tests may pass
    in-memory host batches)."""
    run = VFIRun.from_config(config)
    options = dict(compiler_options) if compiler_options else None
    # Read before anything compiles, so that a missing or wrong file fails fast. A resumed
    # run then replaces these weights with its checkpoint's.
    imported = read_init_weights(run)

    # ---- Mesh and input ----------------------------------------------------------------
    mesh, batch_sharding = sharding.training_mesh(
        run.mesh, RULES, run.train.global_batch_size, devices
    )
    rows = loop.host_rows(batch_sharding, run.train.global_batch_size)
    if batches is None:
        batches = triplet_batches(run, rows)
    if preview_batch is None and run.data.dir and run.train.image_every:
        # Fixed, unshuffled, unaugmented triplets: the same ones at every preview.
        preview_batch = next(triplet_batches(run, rows, shuffle=False, augment=False))
    to_global = loop.global_batcher(BATCH_KEYS, batch_sharding, run.train.global_batch_size)

    # ---- Model and sharded state ---------------------------------------------------------
    # XLA:CPU's optimising compile of the IFNet's initialisation takes ~20 s (3 s at -O0)
    # for a program that runs once: on CPU it is compiled fast unless told otherwise.
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    state, setup = create_train_state(
        run.make_model,
        make_optimizer(run.train),
        seed=run.train.seed,
        mesh=mesh,
        rules=RULES,
        compiler_options=options or (FAST_COMPILE_CPU if on_cpu else None),
    )
    if imported is not None:  # the file's weights, and the EMA starts from them too
        state = state.replace(
            params=with_weights(state.params, imported),
            ema_params=with_weights(state.ema_params, imported),
        )
    logging.info("IFNet: %.2fM parameters; lr %.3g; batch %d of %d^2 triplets, spans %s",
                 count_params(state.params) / 1e6, run.train.learning_rate,
                 run.train.global_batch_size, run.frame_size, run.triplets.spans)  # fmt: skip

    # ---- Step ----------------------------------------------------------------------------
    jitted = jax.jit(
        make_train_step(setup, run),
        in_shardings=(setup.shardings, batch_sharding),
        out_shardings=(setup.shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=options,
    )

    def train_step(state: Any, batch: Any) -> Any:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
            return jitted(state, batch)

    # ---- Preview -------------------------------------------------------------------------
    preview = None
    if preview_batch is not None and run.train.image_every:  # image_every 0: no previews
        fixed = to_global(preview_batch)
        count = min(run.train.preview_count, run.train.global_batch_size)
        graphdef = setup.graphdef

        def predict(state: TrainState, batch: Batch) -> dict[str, Array]:
            rows_of = {k: v[:count] for k, v in batch.items()}
            frame = nnx.merge(graphdef, state.params)(
                rows_of["img0"], rows_of["img1"], rows_of["timestep"]
            )
            return rows_of | {"frame": frame}

        preview_fn = jax.jit(
            predict,
            in_shardings=(setup.shardings, batch_sharding),
            out_shardings=sharding.replicated(mesh),
            compiler_options=options,
        )

        def preview(state: Any) -> dict[str, np.ndarray]:
            from dithead_jax.training.vqgan_train import image_grid

            with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
                out = jax.device_get(preview_fn(state, fixed))
            # Columns: I0 | It (true) | It (interpolated) | I1; image_grid takes [-1, 1].
            columns = [2.0 * np.asarray(out[k]) - 1.0 for k in ("img0", "gt", "frame", "img1")]
            return {"interpolation": image_grid(columns)[None]}

    return loop.Task(
        state=state,
        abstract_state=setup.abstract,
        train_step=train_step,
        batches=batches,
        to_global=to_global,
        examples_per_step=run.train.global_batch_size,
        flops_per_step=None,  # no analytic count for the conv net; MFU is not reported
        preview=preview,
        config=loop.config_dict(config),
    )


def train_vfi(config: Any, workdir: str | os.PathLike, **task_kwargs: Any) -> loop.RunResult:
    """Builds the task from `config` and runs the loop in `workdir` (resuming if possible)."""
    run = VFIRun.from_config(config)
    return loop.run(build_task(config, **task_kwargs), run.train, workdir)


# ---------------------------------------------------------------------------------------
# Loading and held-out quality


def load_run(
    workdir: str | os.PathLike, *, ema: bool = False, step: int | None = None
) -> tuple[IFNet, VFIRun]:
    """The IFNet of the newest (or `step`'s) checkpoint in `workdir` on one device, and its
    run (read from the checkpoint). Plain weights by default, like RIFE (no EMA there)."""
    from dithead_jax.training.checkpoint import restore_trained

    def make_setup(config: dict[str, Any]) -> StateSetup:
        run = VFIRun.from_config(config)
        mesh = sharding.make_mesh("dp", jax.local_devices()[:1])
        return abstract_train_state(run.make_model, make_optimizer(run.train), mesh=mesh,
                                    rules=RULES)  # fmt: skip

    config, setup, state = restore_trained(
        workdir, make_setup, step=step, what="frame-interpolator checkpoint"
    )
    model = nnx.merge(setup.graphdef, state.ema_params if ema else state.params)
    return model, VFIRun.from_config(config)


def load_model(workdir: str | os.PathLike, *, ema: bool = False, step: int | None = None) -> IFNet:
    """The trained IFNet of `workdir` for inference (see `load_run`)."""
    return load_run(workdir, ema=ema, step=step)[0]


def held_out_psnr(
    model: IFNet, data_dir: str | os.PathLike, split: str = "test", batch_size: int = 16
) -> dict[str, float]:
    """Mean PSNR (dB) of the middle frame of every (p, p+1, p+2) triplet of `split` (t = 0.5,
    whole frames, no augmentation), interpolated by `model` and by the two trivial answers:

        model    IFNet(I0, I1, 0.5)
        repeat   I0 (what dropping the frame and holding the last one shows)
        average  (I0 + I1) / 2 (a cross-fade: no motion estimate at all)
    """
    from dithead_jax.data.vfi_triplets import triplet_dataset

    graphdef, params = nnx.split(model)

    @jax.jit
    def interpolate(params: nnx.State, batch: Batch) -> Array:
        return nnx.merge(graphdef, params)(batch["img0"], batch["img1"], batch["timestep"])

    dataset = triplet_dataset(
        data_dir, split, batch_size=batch_size, spans=(2,), random_flip=False,
        random_reverse=False, shuffle=False, num_epochs=1, drop_remainder=False,
    )  # fmt: skip
    scores: dict[str, list[np.ndarray]] = {"model": [], "repeat": [], "average": []}
    for batch in dataset:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        gt, n = batch["gt"], len(batch["gt"])
        # The short last batch padded to the full size: one compiled shape.
        full = {
            k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)]) for k, v in batch.items()
        }
        scores["model"].append(np.asarray(psnr(interpolate(params, full)[:n], gt)))
        scores["repeat"].append(np.asarray(psnr(batch["img0"], gt)))
        scores["average"].append(np.asarray(psnr((batch["img0"] + batch["img1"]) / 2, gt)))
    out = {f"psnr_{k}": float(np.mean(np.concatenate(v))) for k, v in scores.items()}
    return out | {"triplets": int(sum(len(v) for v in scores["model"]))}
