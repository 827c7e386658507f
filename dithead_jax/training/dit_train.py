"""Stage-2 training, assembled: config -> mesh -> data -> sharded state -> step -> loop.

Laid out in big_vision's banner-marked sections so the whole trainer reads top to bottom;
`train.py` is only the command line around `build_task` and `loop.run` (as `train_dit`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from dithead_jax import config as cfg
from dithead_jax import sharding
from dithead_jax.models.dit import DiT
from dithead_jax.models.layers import count_params
from dithead_jax.training import dit_step, loop
from dithead_jax.training import metrics as metrics_lib
from dithead_jax.training.state import (
    StateSetup,
    abstract_train_state,
    create_train_state,
    make_optimizer,
)


@dataclasses.dataclass(frozen=True)
class DiTRun:
    """The typed view of a `configs/dit.py` run config."""

    model: cfg.DiTConfig
    diffusion: cfg.DiffusionConfig
    train: cfg.TrainConfig
    mesh: cfg.MeshConfig
    data: cfg.DataConfig
    # The trained expert's loss (training/sync_loss.py); off (weight 0) unless configured.
    sync_loss: cfg.SyncLossConfig = cfg.SyncLossConfig()

    @classmethod
    def from_config(cls, config: Any) -> DiTRun:
        sync = config.get("sync_loss") or {}
        run = cls(
            sync_loss=cfg.from_dict(cfg.SyncLossConfig, sync, "config.sync_loss"),
            model=cfg.from_dict(cfg.DiTConfig, config.model, "config.model"),
            diffusion=cfg.from_dict(cfg.DiffusionConfig, config.diffusion, "config.diffusion"),
            train=cfg.from_dict(cfg.TrainConfig, config.train, "config.train"),
            mesh=sharding.mesh_config(config.mesh),
            data=cfg.from_dict(cfg.DataConfig, config.data, "config.data"),
        )
        if run.diffusion.audio_dropout and not run.model.null_audio:
            raise cfg.ConfigError(
                "config.model.null_audio", "must be True when diffusion.audio_dropout > 0"
            )
        return run  # impossible values were refused by the dataclasses (config.py)


def example_shapes(model: cfg.DiTConfig) -> dict[str, tuple[int, ...]]:
    """The per-example shapes of what the model reads from a stage-2 batch (the loss mask
    aside): what the records must hold, and what `lower_train_step` lowers for."""
    latent = (model.input_size, model.input_size, model.latent_channels)
    shapes = {k: latent for k in ("latent", "masked_latent", "reference_latent")}
    shapes["audio"] = (model.audio_window, model.audio_dim)
    if model.landmark_tokens:
        shapes["landmarks"] = (len(cfg.CONDITION_LANDMARKS), 2)
    return shapes


def _check_batch(batch: Mapping[str, np.ndarray], model: cfg.DiTConfig) -> None:
    for key, shape in example_shapes(model).items():
        if key not in batch:
            raise ValueError(f"stage-2 batches need {key!r}; got {sorted(batch)}")
        if tuple(batch[key].shape[1:]) != shape:
            raise ValueError(
                f"{key}: records hold {tuple(batch[key].shape[1:])}, the model wants {shape} "
                "(check --config.model.input_size / latent_channels against the records)"
            )


def dit_batches(
    run: DiTRun, rows: tuple[int, int] | None = None, *, shuffle: bool = True, seed_offset: int = 0
) -> Iterator:
    """This process's rows [start, stop) of each global stage-2 batch (a checkpointable
    grain iterator; `loop.host_rows` gives a sharding's rows, the default is an equal
    contiguous share per process)."""
    from dithead_jax.data import pipelines  # imports TFDS: only when records are read

    if not run.data.dir:
        raise ValueError("--config.data.dir must name stage-2 latent records")
    make = pipelines.dit_dataset
    if run.sync_loss.weight:  # runs of 5 consecutive frames for the expert
        from dithead_jax.data.sync_windows import dit_group_dataset as make
    dataset = make(
        run.data.dir,
        "train",
        batch_size=run.train.global_batch_size,
        seed=run.train.seed + seed_offset,
        min_reference_distance=run.data.min_reference_distance,
        with_mask=bool(run.diffusion.mask_weight),
        with_landmarks=run.model.landmark_tokens,
        shuffle=shuffle,
        host_rows=rows,
    )
    return iter(dataset)


def warm_start_weights(run: DiTRun, workdir: str | os.PathLike | None) -> Any:
    """The `convert.dit_weights.DiTImport` of `run.train.init_from` for a fresh run; None
    without init_from, or when `workdir` holds a checkpoint (the run resumes from that).
    Without a workdir the import is made, and a resume would replace it."""
    path = run.train.init_from
    if not path:
        return None
    if workdir is not None:
        from dithead_jax.training.checkpoint import Checkpointer, as_path

        directory = as_path(workdir) / "checkpoints"
        if directory.exists():
            ckpt = Checkpointer(directory)
            try:
                step = ckpt.latest_step()
            finally:
                ckpt.close()
            if step is not None:
                logging.info("Ignoring train.init_from=%s: resuming from step %d in %s",
                             path, step, directory)  # fmt: skip
                return None
    from dithead_jax.convert import dit_weights

    imported = dit_weights.load_dit_weights(path, run.model)
    logging.info("%s", imported.summary())
    return imported


def build_task(
    config: Any,
    *,
    batches: Iterator[Mapping[str, np.ndarray]] | None = None,
    preview_batch: Mapping[str, np.ndarray] | None = None,
    devices: list | None = None,
    compiler_options: dict[str, Any] | None = None,
    workdir: str | os.PathLike | None = None,
) -> loop.Task:
    """Everything the loop needs for a DiT run. `batches` / `preview_batch` default to the
    records in `config.data.dir` (tests may pass in-memory host batches instead);
    `compiler_options` go to every jit (see `dit_step.jit_train_step`); `workdir` (the
    run's) only decides whether `train.init_from` applies (see `warm_start_weights`)."""
    run = DiTRun.from_config(config)
    # Read before anything compiles, so that a wrong file fails fast.
    warm_start = warm_start_weights(run, workdir)

    # ---- Mesh --------------------------------------------------------------------------
    rules = sharding.DIT_RULES
    mesh, batch_sharding = sharding.training_mesh(
        run.mesh, rules, run.train.global_batch_size, devices
    )

    # ---- Input -------------------------------------------------------------------------
    # Every process reads only the rows of each global batch its devices hold.
    rows = loop.host_rows(batch_sharding, run.train.global_batch_size)
    logging.info("Process %d reads rows [%d, %d) of each global batch of %d",
                 jax.process_index(), *rows, run.train.global_batch_size)  # fmt: skip
    if batches is None:
        batches = dit_batches(run, rows)
    if preview_batch is None and run.data.dir:
        # A fixed, unshuffled batch: the preview shows the same examples at every step.
        preview_batch = next(dit_batches(run, rows, shuffle=False, seed_offset=1))

    to_global = loop.global_batcher(
        dit_step.batch_keys(run.diffusion, run.model), batch_sharding, run.train.global_batch_size
    )

    # ---- Model and sharded state ---------------------------------------------------------
    tx = make_optimizer(run.train)
    state, setup = create_train_state(
        lambda rngs: DiT(run.model, rngs=rngs),
        tx,
        seed=run.train.seed,
        mesh=mesh,
        rules=rules,
        compiler_options=compiler_options,
    )
    if warm_start is not None:  # the file's weights, then the usual EMA copy of them
        from dithead_jax.convert.dit_weights import apply_import

        state = state.replace(
            params=apply_import(state.params, warm_start),
            ema_params=apply_import(state.ema_params, warm_start),
        )
    logging.info("DiT: %.1fM parameters, compute %s, params %s",
                 count_params(state.params) / 1e6, run.model.dtype,
                 run.model.param_dtype)  # fmt: skip

    # ---- Step ----------------------------------------------------------------------------
    sync, frozen = None, ()
    if run.sync_loss.weight:  # frozen expert + frame VQGAN: an argument, not in the state
        from dithead_jax.training import sync_loss

        sync, weights = sync_loss.build(
            run.sync_loss, run.data.dir, run.diffusion, sharding.replicated(mesh)
        )
        frozen = (weights,)
    step_fn = dit_step.make_train_step(setup, run.diffusion, run.train, sync)
    jitted = dit_step.jit_train_step(
        step_fn, setup, batch_sharding, compiler_options, with_frozen=sync is not None
    )

    def train_step(state: Any, batch: Any) -> Any:
        # Traced under the rules so that the model's activation constraints apply.
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jitted(state, batch, *frozen)

    # ---- Preview -------------------------------------------------------------------------
    preview = None
    if preview_batch is not None:
        _check_batch(preview_batch, run.model)
        fixed = to_global(preview_batch)
        count = min(run.train.preview_count, run.train.global_batch_size)
        preview_fn = dit_step.make_preview(
            setup, run.diffusion, batch_sharding, count, run.train.seed, compiler_options
        )
        columns = ("latent", "masked_latent", "reference_latent", "noisy", "denoised",
                   "denoised_ema")  # fmt: skip

        def preview(state: Any) -> dict[str, np.ndarray]:
            with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
                out = jax.device_get(preview_fn(state, fixed))
            # Columns: target | masked | reference | z_t (noise grows down) | x0 | x0 (EMA)
            return {"preview": metrics_lib.latent_grid([out[c] for c in columns])[None]}

    return loop.Task(
        state=state,
        abstract_state=setup.abstract,
        train_step=train_step,
        batches=batches,
        to_global=to_global,
        examples_per_step=run.train.global_batch_size,
        flops_per_step=dit_step.dit_train_flops(run.model, run.train.global_batch_size),
        preview=preview,
        config=loop.config_dict(config),
    )


def lower_train_step(
    model: cfg.DiTConfig,
    train: cfg.TrainConfig,
    mesh: jax.sharding.Mesh,
    *,
    diffusion: cfg.DiffusionConfig | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[StateSetup, jax.stages.Lowered]:
    """The DiT train step lowered for abstract inputs (global batch `train.global_batch_size`)
    on `mesh`, traced as `build_task` traces it: on the mesh, under the DiT's rules. Nothing
    is allocated, so `.compile()` gives the per-device memory, FLOPs and collectives of
    sizes that do not fit this machine (bench/dit.py, tests/test_compiled_sharding.py)."""
    rules = sharding.DIT_RULES
    setup = abstract_train_state(
        lambda rngs: DiT(model, rngs=rngs), make_optimizer(train), mesh=mesh, rules=rules
    )
    batch_sharding = sharding.batch_sharding(rules, mesh)
    n = train.global_batch_size
    batch = {k: jax.ShapeDtypeStruct((n, *v), np.float32, sharding=batch_sharding)
             for k, v in example_shapes(model).items()}  # fmt: skip
    step_fn = dit_step.make_train_step(setup, diffusion or cfg.DiffusionConfig(), train)
    jitted = dit_step.jit_train_step(step_fn, setup, batch_sharding, compiler_options)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return setup, jitted.lower(setup.abstract, batch)


def train_dit(config: Any, workdir: str | os.PathLike, **task_kwargs: Any) -> loop.RunResult:
    """Builds the task from `config` and runs the loop in `workdir` (resuming if possible)."""
    run = DiTRun.from_config(config)
    task = build_task(config, workdir=workdir, **task_kwargs)
    return loop.run(task, run.train, workdir)


def load_model(workdir: str | os.PathLike, config: Any, *, ema: bool = True) -> nnx.Module:
    """The DiT of the newest checkpoint in `workdir` (EMA weights by default), on one device."""
    from dithead_jax.training.checkpoint import Checkpointer, as_path

    run = DiTRun.from_config(config)
    mesh = sharding.make_mesh("dp", jax.local_devices()[:1])
    make_model = lambda rngs: DiT(run.model, rngs=rngs)
    setup = abstract_train_state(
        make_model, make_optimizer(run.train), mesh=mesh, rules=sharding.DIT_RULES
    )
    ckpt = Checkpointer(as_path(workdir) / "checkpoints")
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        state = ckpt.restore(step, setup.abstract)
    finally:
        ckpt.close()
    return nnx.merge(setup.graphdef, state.ema_params if ema else state.params)
