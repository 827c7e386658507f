"""Stage-1 training, assembled: config -> mesh -> data -> sharded state -> step -> loop.

Mirrors `dit_train.py` section for section; the stage-specific parts are:

One train state for two networks. `VQGANTrainer` holds the VQGAN, the PatchGAN
discriminator and the codebook ages, so `TrainState.params` (every nnx.Param) covers all
of them and the shared loop, checkpointer and sharding rules apply unchanged. A single
Adam(b1 0.5, b2 0.9) over the combined tree is exactly two Adams with the same
hyperparameters (Adam is elementwise and both share the step count) provided each network's
gradient comes only from its own loss: the step takes the generator loss's gradient w.r.t.
the VQGAN alone (the discriminator is a constant there) and the hinge loss's gradient
w.r.t. the discriminator alone (the reconstructions are constants), and stitches the two
into one gradient tree. Unlike taming (two optimiser passes, the second re-running the
updated generator), D sees this step's pre-update reconstructions -- the usual
simultaneous-update GAN step, and one VQGAN forward instead of two.

Dead codes. The per-code age (steps since last picked) lives in the trainer as a float32
`nnx.Param` (`code_age`), so it is checkpointed, sharded and restored with everything else
(`create_train_state` accepts nnx.Param state only). No loss reads it, so its gradient is
zero and Adam leaves it alone (zero moments give a zero update); after the update the step
overwrites it, and the codebook, with `vqgan.refresh_codebook`'s results. Ages are small
integers, exact in float32. With `dead_code_steps == 0` the ages still count but nothing is
ever reset.

LPIPS is frozen and not trained: its weights travel as a separate, replicated argument of
the jitted step (not a closure constant, which XLA would embed in the program).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from dithead_jax import config as cfg
from dithead_jax import sharding
from dithead_jax.models.layers import count_params, partitioned
from dithead_jax.models.vqgan import VQGAN, refresh_codebook
from dithead_jax.training import loop
from dithead_jax.training import vqgan_losses as losses
from dithead_jax.training.state import (
    StateSetup,
    TrainState,
    abstract_train_state,
    apply_gradients,
    create_train_state,
    guard_update,
    learning_rate_schedule,
)

Array = jax.Array
Batch = Mapping[str, Array]
Metrics = dict[str, Array]
BATCH_KEYS = ("image",)


@dataclasses.dataclass(frozen=True)
class VQGANRun:
    """The typed view of a `configs/vqgan.py` run config (a ConfigDict or its saved dict)."""

    model: cfg.VQGANConfig
    loss: cfg.VQGANLossConfig
    train: cfg.TrainConfig
    mesh: cfg.MeshConfig
    data: cfg.DataConfig
    target: str = "frames"
    use_lpips: bool = True
    # Train on random (crop, crop) windows of the frames (0 = whole frames), as LDM trains
    # its autoencoders on crops: the networks are convolutional, so a step costs
    # (crop / S)^2 as much and short runs take several times more steps.
    crop: int = 0

    @classmethod
    def from_config(cls, config: Any) -> VQGANRun:
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        stage = get("stage", "vqgan")
        if stage != "vqgan":
            raise ValueError(f"config.stage is {stage!r}; this trainer runs 'vqgan'")
        target = get("target", "frames")
        if target not in ("frames", "masked"):
            raise ValueError(f"config.target must be 'frames' or 'masked', got {target!r}")
        run = cls(
            model=cfg.from_dict(cfg.VQGANConfig, config["model"], "config.model"),
            loss=cfg.from_dict(cfg.VQGANLossConfig, config["loss"], "config.loss"),
            train=cfg.from_dict(cfg.TrainConfig, config["train"], "config.train"),
            mesh=sharding.mesh_config(config["mesh"]),
            data=cfg.from_dict(cfg.DataConfig, config["data"], "config.data"),
            target=target,
            use_lpips=bool(get("use_lpips", True)),
            crop=int(get("crop", 0)),
        )
        if run.crop and (run.crop % run.model.downsample_factor or run.crop > run.data.image_size):
            raise ValueError(
                f"crop {run.crop} must divide by the VQGAN's factor "
                f"{run.model.downsample_factor} and be at most data.image_size"
            )
        if run.loss.mask_weight < 0:
            raise ValueError(f"loss.mask_weight must be >= 0, got {run.loss.mask_weight}")
        if run.loss.mask_weight and target == "masked":
            # E_m's decoder is discarded and its mask region is a constant fill: nothing
            # there to weight. One config then serves both VQGANs of a run.
            logging.info("loss.mask_weight applies to the frames VQGAN only; ignored here")
            run = dataclasses.replace(run, loss=dataclasses.replace(run.loss, mask_weight=0.0))
        if run.loss.perceptual_weight and not run.use_lpips:
            raise ValueError("loss.perceptual_weight > 0 needs use_lpips=True (or set it to 0)")
        return run

    @property
    def learning_rate(self) -> float:
        return self.loss.learning_rate(self.train.global_batch_size)


# ---------------------------------------------------------------------------------------
# The trained modules and the step


class VQGANTrainer(nnx.Module):
    """Everything stage 1 trains or carries, as one module (see the module doc)."""

    def __init__(self, model: cfg.VQGANConfig, loss: cfg.VQGANLossConfig, *, rngs: nnx.Rngs):
        self.vqgan = VQGAN(model, rngs=rngs)
        self.disc = losses.discriminator_model(loss, rngs=rngs, in_channels=model.out_channels)
        zeros = partitioned(nnx.initializers.zeros_init(), ("codebook",))
        self.code_age = nnx.Param(zeros(rngs.params(), (model.codebook_size,), jnp.float32))


def make_optimizer(run: VQGANRun) -> optax.GradientTransformation:
    return losses.optimizer(run.loss, run.train)


def make_train_step(
    setup: StateSetup, run: VQGANRun, lpips_graphdef: nnx.GraphDef | None
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, Metrics]]:
    """The un-jitted step: (state, global batch, LPIPS state) -> (new state, metrics).

    As in `dit_step`, the per-step key is `fold_in(key(seed), step)` (a resumed run resets
    the same codes an uninterrupted one would) and a non-finite loss, gradient or updated
    parameter leaves the state untouched, so the loop can stop with the last good weights
    intact.
    """
    graphdef, tx, loss_cfg = setup.graphdef, setup.tx, run.loss
    base_key = jax.random.key(run.train.seed)
    lr_schedule = learning_rate_schedule(run.train, run.learning_rate)

    def step_fn(state: TrainState, batch: Batch, lpips_state: Any) -> tuple[TrainState, Metrics]:
        step = state.step
        lpips = nnx.merge(lpips_graphdef, lpips_state) if lpips_graphdef is not None else None
        trainer = nnx.merge(graphdef, state.params)
        vq_def, vq_params = nnx.split(trainer.vqgan, nnx.Param)
        d_def, d_params = nnx.split(trainer.disc, nnx.Param)

        # Generator: gradient w.r.t. the VQGAN only; the discriminator is read, not trained.
        def generator(p: nnx.State) -> tuple[Array, dict[str, Any]]:
            vqgan = nnx.merge(vq_def, p)
            return losses.vqgan_generator_loss(vqgan, trainer.disc, lpips, batch, step, loss_cfg)

        (loss, aux), g_grads = jax.value_and_grad(generator, has_aux=True)(vq_params)

        # Discriminator: hinge on real frames vs. this step's (constant) reconstructions.
        def discriminator(p: nnx.State) -> tuple[Array, dict[str, Array]]:
            disc = nnx.merge(d_def, p)
            return losses.discriminator_loss(disc, batch, aux["reconstructions"], step, loss_cfg)

        def train_discriminator(_: None) -> tuple[nnx.State, dict[str, Array]]:
            (_, metrics), grads = jax.value_and_grad(discriminator, has_aux=True)(d_params)
            return grads, metrics

        def discriminator_idle(_: None) -> tuple[nnx.State, dict[str, Array]]:
            # Before disc_start its loss is scaled by 0: skip its two passes and backward
            # (28% of the demo step's time, which never reaches disc_start; half of an
            # f4_16384 run) rather than multiply their result by zero.
            shapes = jax.eval_shape(train_discriminator, None)
            return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        training_disc = losses.disc_factor(step, loss_cfg) > 0
        d_grads, d_metrics = jax.lax.cond(
            training_disc, train_discriminator, discriminator_idle, None
        )

        grads = jax.tree.map(jnp.zeros_like, state.params)  # code_age: zero gradient
        grads["vqgan"], grads["disc"] = g_grads, d_grads
        resets = []

        def codebook_upkeep(params: nnx.State) -> nnx.State:
            quantize = params["vqgan"]["quantize"]
            codebook, age, reset = refresh_codebook(
                quantize["codebook"][...],
                params["code_age"][...].astype(jnp.int32),
                aux["indices"],
                aux["latents"],
                jax.random.fold_in(base_key, step),
                loss_cfg.dead_code_steps,
            )
            quantize["codebook"] = quantize["codebook"].replace(codebook)
            params["code_age"] = params["code_age"].replace(age.astype(jnp.float32))
            resets.append(reset)
            return params

        new_state = apply_gradients(state, grads, tx, run.train, edit=codebook_upkeep)
        reset = resets[0]
        grad_norm = optax.global_norm(grads)
        new_state, guard = guard_update(new_state, state, loss, grad_norm)
        metrics = aux["metrics"] | d_metrics | guard
        metrics |= {
            "grad_norm": grad_norm,
            "generator_grad_norm": optax.global_norm(g_grads),
            "disc_grad_norm": optax.global_norm(d_grads),
            "codes_reset": reset,
            "lr": lr_schedule(step),
        }
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return step_fn


def make_preview(setup: StateSetup, count: int) -> Callable[[TrainState, Batch], dict[str, Array]]:
    """(state, batch) -> the first `count` images and their reconstructions by the current
    and the EMA weights, all (n, H, W, 3) in [-1, 1] (un-jitted; see `build_task`)."""
    graphdef = setup.graphdef

    def preview(state: TrainState, batch: Batch) -> dict[str, Array]:
        images = losses.images_of(batch)[:count]
        out = {"original": images}
        for name, params in (("reconstruction", state.params), ("ema", state.ema_params)):
            out[name] = nnx.merge(graphdef, params).vqgan(images)[0]
        return out

    return preview


def image_grid(columns: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """(H, W, 3) in [0, 1]: one row per example, one column per (n, h, w, 3) array in
    [-1, 1], white gutters between tiles."""
    n, h, w, _ = np.shape(columns[0])
    grid = np.ones((n * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), np.float32)
    for j, column in enumerate(columns):
        tiles = np.clip((np.asarray(column, np.float32) + 1.0) / 2.0, 0.0, 1.0)
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = tiles[i]
    return grid


# ---------------------------------------------------------------------------------------
# Assembly


def vqgan_batches(
    run: VQGANRun,
    rows: tuple[int, int] | None = None,
    *,
    shuffle: bool = True,
    seed_offset: int = 0,
    crop: bool = True,
) -> Iterator:
    """This process's rows [start, stop) of each global stage-1 batch {"image": (B, S, S, 3)
    in [-1, 1]} (a grain iterator), random `run.crop` windows unless crop=False."""
    from dithead_jax.data import pipelines  # imports TFDS: only when records are read

    if not run.data.dir:
        raise ValueError("--config.data.dir must name stage-1 frame records")
    dataset = pipelines.vqgan_dataset(
        run.data.dir,
        "train",
        batch_size=run.train.global_batch_size,
        seed=run.train.seed + seed_offset,
        target=run.target,  # type: ignore[arg-type]
        shuffle=shuffle,
        crop=run.crop if crop else 0,
        with_mask=bool(run.loss.mask_weight),
        host_rows=rows,
    )
    return iter(dataset)


def build_task(
    config: Any,
    *,
    batches: Iterator[Mapping[str, np.ndarray]] | None = None,
    preview_batch: Mapping[str, np.ndarray] | None = None,
    devices: list | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> loop.Task:
    """Everything the loop needs for a VQGAN run. `batches` / `preview_batch` default to
    the records in `config.data.dir` (tests may pass in-memory host batches instead);
    `compiler_options` go to every jit (e.g. `dit_step.FAST_COMPILE_CPU` in tests)."""
    run = VQGANRun.from_config(config)
    options = dict(compiler_options) if compiler_options else None

    # ---- Mesh --------------------------------------------------------------------------
    rules = sharding.VQGAN_RULES
    mesh, batch_sharding = sharding.training_mesh(
        run.mesh, rules, run.train.global_batch_size, devices
    )

    # ---- Input -------------------------------------------------------------------------
    # Every process reads only the rows of each global batch its devices hold.
    rows = loop.host_rows(batch_sharding, run.train.global_batch_size)
    logging.info("Process %d reads rows [%d, %d) of each global batch of %d",
                 jax.process_index(), *rows, run.train.global_batch_size)  # fmt: skip
    if batches is None:
        batches = vqgan_batches(run, rows)
    if preview_batch is None and run.data.dir:
        # A fixed, unshuffled batch of whole frames: the same ones at every preview.
        preview_batch = next(vqgan_batches(run, rows, shuffle=False, seed_offset=1, crop=False))

    keys = BATCH_KEYS + (("mask",) if run.loss.mask_weight else ())
    to_global = loop.global_batcher(keys, batch_sharding, run.train.global_batch_size)

    # ---- Model and sharded state ---------------------------------------------------------
    make_model = lambda rngs: VQGANTrainer(run.model, run.loss, rngs=rngs)
    state, setup = create_train_state(
        make_model,
        make_optimizer(run),
        seed=run.train.seed,
        mesh=mesh,
        rules=rules,
        compiler_options=options,
    )
    logging.info("VQGAN + discriminator: %.2fM parameters; lr %.3g; target %s",
                 count_params(state.params) / 1e6, run.learning_rate, run.target)  # fmt: skip

    # ---- Frozen LPIPS --------------------------------------------------------------------
    lpips_graphdef, lpips_state = None, {}
    if run.use_lpips and run.loss.perceptual_weight:
        from dithead_jax.convert.lpips_weights import load_lpips

        lpips_graphdef, lpips_state = nnx.split(load_lpips())
        lpips_state = jax.device_put(lpips_state, sharding.replicated(mesh))

    # ---- Step ----------------------------------------------------------------------------
    jitted = jax.jit(
        make_train_step(setup, run, lpips_graphdef),
        in_shardings=(setup.shardings, batch_sharding, sharding.replicated(mesh)),
        out_shardings=(setup.shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=options,
    )

    def train_step(state: Any, batch: Any) -> Any:
        # Traced under the rules so that the models' activation constraints apply.
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jitted(state, batch, lpips_state)

    # ---- Preview -------------------------------------------------------------------------
    preview = None
    if preview_batch is not None:
        fixed = to_global(preview_batch)
        count = min(run.train.preview_count, run.train.global_batch_size)
        preview_fn = jax.jit(
            make_preview(setup, count),
            in_shardings=(setup.shardings, batch_sharding),
            out_shardings=sharding.replicated(mesh),
            compiler_options=options,
        )

        def preview(state: Any) -> dict[str, np.ndarray]:
            with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
                out = jax.device_get(preview_fn(state, fixed))
            # Columns: original | reconstruction | reconstruction by the EMA weights.
            grid = image_grid([out["original"], out["reconstruction"], out["ema"]])
            return {"reconstructions": grid[None]}

    return loop.Task(
        state=state,
        abstract_state=setup.abstract,
        train_step=train_step,
        batches=batches,
        to_global=to_global,
        examples_per_step=run.train.global_batch_size,
        flops_per_step=None,  # no analytic count for the conv nets; MFU is not reported
        preview=preview,
        config=loop.config_dict(config),
    )


def train_vqgan(config: Any, workdir: str | os.PathLike, **task_kwargs: Any) -> loop.RunResult:
    """Builds the task from `config` and runs the loop in `workdir` (resuming if possible)."""
    run = VQGANRun.from_config(config)
    task = build_task(config, **task_kwargs)
    return loop.run(task, run.train, workdir)


def load_model(workdir: str | os.PathLike, *, ema: bool = False, step: int | None = None) -> VQGAN:
    """The VQGAN of the newest (or `step`'s) checkpoint in `workdir`, on one device.

    The run config is read from the checkpoint itself. Plain weights by default: LDM's
    VQGANs keep no EMA, and an averaged codebook blurs codes that were re-seeded as dead.
    """
    from dithead_jax.training.checkpoint import restore_trained

    def make_setup(config: dict[str, Any]) -> StateSetup:
        run = VQGANRun.from_config(config)
        return abstract_train_state(
            lambda rngs: VQGANTrainer(run.model, run.loss, rngs=rngs),
            make_optimizer(run),
            mesh=sharding.make_mesh("dp", jax.local_devices()[:1]),
            rules=sharding.VQGAN_RULES,
        )

    _, setup, state = restore_trained(workdir, make_setup, step=step)
    trainer = nnx.merge(setup.graphdef, state.ema_params if ema else state.params)
    return trainer.vqgan
