"""The sync expert's training, assembled like `vqgan_train.py`: config -> mesh -> 5-frame
windows -> sharded state -> InfoNCE step -> the shared loop (Orbax checkpoints,
TensorBoard, resume).

Why InfoNCE rather than Wav2Lip's BCE on one cosine per pair: every step scores each lip
window against all B audio windows of the batch (other clips: other faces and voices; and
other times) plus its own clip's audio shifted by 2..15 frames (same face, same voice: only
the timing differs), so each example brings B negatives instead of one. On the demo's 60-s
budget that is the difference between a few thousand and a few hundred pair comparisons
per second of CPU. The shifted negative keeps it from passing on identity alone: with only
other-clip negatives an expert can match a face to its voice and ignore the mouth.

    python train.py --config configs/sync_expert.py:demo --workdir W --config.data.dir=STAGE1
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from dithead_jax import config as cfg
from dithead_jax import sharding
from dithead_jax.models.layers import count_params
from dithead_jax.models.sync_expert import SyncExpert, info_nce
from dithead_jax.training import loop
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
BATCH_KEYS = ("frames", "audio", "shifted_audio")
RULES = sharding.VQGAN_RULES  # a conv net: the VQGANs' rule set


@dataclasses.dataclass(frozen=True)
class SyncExpertRun:
    """The typed view of a `configs/sync_expert.py` run config (or its saved dict)."""

    model: cfg.SyncExpertConfig
    train: cfg.TrainConfig
    mesh: cfg.MeshConfig
    data: cfg.DataConfig

    @classmethod
    def from_config(cls, config: Any) -> SyncExpertRun:
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        if get("stage", "sync_expert") != "sync_expert":
            raise ValueError(f"config.stage is {get('stage')!r}; this trainer runs 'sync_expert'")
        run = cls(
            model=cfg.from_dict(cfg.SyncExpertConfig, config["model"], "config.model"),
            train=cfg.from_dict(cfg.TrainConfig, config["train"], "config.train"),
            mesh=sharding.mesh_config(config["mesh"]),
            data=cfg.from_dict(cfg.DataConfig, config["data"], "config.data"),
        )
        if run.model.image_size != run.data.image_size:
            raise cfg.ConfigError(
                "config.model.image_size",
                f"is {run.model.image_size}, but data.image_size is {run.data.image_size}",
            )
        return run

    def make_model(self, rngs: nnx.Rngs) -> SyncExpert:
        return SyncExpert(self.model, self.data.audio_window, self.data.audio_dim, rngs=rngs)


def make_train_step(
    setup: StateSetup, run: SyncExpertRun
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """The un-jitted step: (state, global batch) -> (new state, metrics); a non-finite loss,
    gradient or update leaves the state untouched (`state.guard_update`)."""

    def loss_of(model: SyncExpert, batch: Batch) -> tuple[Array, dict[str, Array]]:
        lips, audio = model(batch["frames"], batch["audio"])
        shifted = model.embed_audio(batch["shifted_audio"])
        return info_nce(lips, audio, shifted, run.model.temperature)

    return supervised_step(setup, run.train, loss_of)


def sync_batches(
    run: SyncExpertRun,
    rows: tuple[int, int] | None = None,
    *,
    split: str = "train",
    shuffle: bool = True,
    num_epochs: int | None = None,
    seed_offset: int = 0,
) -> Iterator:
    """This process's rows of each global batch of 5-frame windows (a grain iterator)."""
    from dithead_jax.data.sync_windows import sync_window_dataset  # TFDS: only when read

    if not run.data.dir:
        raise ValueError("--config.data.dir must name stage-1 frame records")
    return iter(
        sync_window_dataset(
            run.data.dir,
            split,
            batch_size=run.train.global_batch_size,
            seed=run.train.seed + seed_offset,
            min_offset=run.model.min_offset,
            max_offset=run.model.max_offset,
            shuffle=shuffle,
            num_epochs=num_epochs,
            host_rows=rows,
        )
    )


def build_task(
    config: Any,
    *,
    batches: Iterator[Mapping[str, np.ndarray]] | None = None,
    devices: list | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> loop.Task:
    """Everything the loop needs for a sync-expert run; `batches` defaults to the windows
    of `config.data.dir`'s training split (tests pass in-memory host batches)."""
    run = SyncExpertRun.from_config(config)
    options = dict(compiler_options) if compiler_options else None

    # ---- Mesh and input ----------------------------------------------------------------
    mesh, batch_sharding = sharding.training_mesh(
        run.mesh, RULES, run.train.global_batch_size, devices
    )
    rows = loop.host_rows(batch_sharding, run.train.global_batch_size)
    if batches is None:
        batches = sync_batches(run, rows)
    to_global = loop.global_batcher(BATCH_KEYS, batch_sharding, run.train.global_batch_size)

    # ---- Model and sharded state ---------------------------------------------------------
    state, setup = create_train_state(
        run.make_model,
        make_optimizer(run.train),
        seed=run.train.seed,
        mesh=mesh,
        rules=RULES,
        compiler_options=options,
    )
    logging.info("Sync expert: %.2fM parameters; lr %.3g; batch %d",
                 count_params(state.params) / 1e6, run.train.learning_rate,
                 run.train.global_batch_size)  # fmt: skip

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

    return loop.Task(
        state=state,
        abstract_state=setup.abstract,
        train_step=train_step,
        batches=batches,
        to_global=to_global,
        examples_per_step=run.train.global_batch_size,
        config=loop.config_dict(config),
    )


# ---------------------------------------------------------------------------------------
# Loading and held-out accuracy


def load_expert(
    workdir: str | os.PathLike, *, ema: bool = False, step: int | None = None
) -> tuple[SyncExpert, SyncExpertRun]:
    """The expert of the newest (or `step`'s) checkpoint in `workdir` on one device, and
    its run (read from the checkpoint: image size, audio window, offsets)."""
    from dithead_jax.training.checkpoint import restore_trained

    def make_setup(config: dict[str, Any]) -> StateSetup:
        run = SyncExpertRun.from_config(config)
        mesh = sharding.make_mesh("dp", jax.local_devices()[:1])
        return abstract_train_state(run.make_model, make_optimizer(run.train), mesh=mesh,
                                    rules=RULES)  # fmt: skip

    config, setup, state = restore_trained(
        workdir, make_setup, step=step, what="sync-expert checkpoint"
    )
    run = SyncExpertRun.from_config(config)
    return nnx.merge(setup.graphdef, state.ema_params if ema else state.params), run


def held_out_accuracy(
    model: SyncExpert, run: SyncExpertRun, split: str = "test", batch_size: int = 32
) -> dict[str, float]:
    """Over every 5-frame window of `split` (one pass, fixed shifted-audio draws):

    offset_accuracy  cos(lips, own audio) > cos(lips, own clip's audio 2..15 frames off)
    accuracy         top-1 of the own audio among the batch's audio + the shifted one
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state: nnx.State, batch: Batch) -> dict[str, Array]:
        m = nnx.merge(graphdef, state)
        lips, audio = m(batch["frames"], batch["audio"])
        loss, aux = info_nce(lips, audio, m.embed_audio(batch["shifted_audio"]), 1.0)
        return aux

    train = dataclasses.replace(run.train, global_batch_size=batch_size)
    run = dataclasses.replace(run, train=train)
    totals: dict[str, list[float]] = {}
    for batch in sync_batches(run, (0, batch_size), split=split, shuffle=False, num_epochs=1):
        for k, v in jax.device_get(score(state, dict(batch))).items():
            totals.setdefault(k, []).append(float(v))
    if not totals:
        raise ValueError(f"split {split!r} has fewer than {batch_size} windows")
    return {k: float(np.mean(v)) for k, v in totals.items()}
