"""The trained sync expert's loss on the DiT (LatentSync-style; `SyncLossConfig`, off in the
paper's recipe).

In the step, for a batch of runs of 5 consecutive frames (`data.sync_windows.
dit_group_dataset`: rows 5g..5g+4 are one clip's frames p..p+4):

    x0_hat   the one-step estimate of each target latent from the model's prediction
             (`schedule.to_x0_and_eps` at the example's own t)
    gate     frames with t >= max_timestep keep their TRUE latent (no gradient): an
             estimate from mostly-noise carries no mouth worth judging (LatentSync)
    decode   un-normalise with the stage-2 dataset's statistics (z * std + mean), decode
             with the frozen frame VQGAN (quantised with its straight-through estimator,
             as sampling decodes), resize to the expert's crop size
    expert   lips of each run of 5 against the audio window of its centre frame:
             d_g = 1 - cos(lip_g, audio_g), in [0, 2]
    loss     weight * sum_g (u_g / 5) d_g / G, u_g = frames of run g under the gate: a run
             with no frame under the threshold contributes exactly zero

Frozen weights. The expert and the VQGAN (with the statistics) form one pytree passed to
the jitted step as an argument, replicated, never part of `TrainState`: the optimiser, the
EMA and the checkpoints never see them, and `jax.grad` w.r.t. the DiT's params treats them
as constants (they are `stop_gradient`ed here as well, so no caller can train them by
accident). Not closed over: XLA would embed tens of MB of constants into the program.

x0_hat comes from what the denoising loss already computed: `dit_loss`'s aux holds z_t, t,
the model's prediction and (with audio dropout) which examples lost their audio.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from dithead_jax.config import DiffusionConfig, SyncLossConfig
from dithead_jax.diffusion import schedule as diffusion
from dithead_jax.models.sync_expert import CENTRE, LIP_FRAMES, sync_distance


@dataclasses.dataclass(frozen=True)
class SyncLoss:
    """The static half of the sync loss (graph definitions, config); the frozen weights
    travel separately (see the module doc)."""

    cfg: SyncLossConfig
    expert_graphdef: nnx.GraphDef
    vqgan_graphdef: nnx.GraphDef
    schedule: diffusion.Schedule
    prediction: diffusion.Prediction
    image_size: int  # the expert's crop size

    def x0_hat(self, aux: dict[str, Array]) -> Array:
        """(B, h, w, c) the one-step estimate of each target from `dit_loss`'s aux (its
        z_t, t and the model's eps or v prediction)."""
        x0, _ = diffusion.to_x0_and_eps(
            self.prediction, self.schedule, aux["x_t"], aux["t"], aux["prediction"]
        )
        return x0

    def __call__(
        self,
        frozen: Any,
        x0_hat: Float[Array, "b h w c"],
        z0: Float[Array, "b h w c"],
        t: Int[Array, " b"],
        audio: Float[Array, "b w d"],
    ) -> tuple[Array, dict[str, Array]]:
        """(weighted loss, metrics) for one batch of runs of 5 (see the module doc)."""
        b = x0_hat.shape[0]
        if b % LIP_FRAMES:
            raise ValueError(f"the sync loss needs runs of {LIP_FRAMES} frames; batch is {b}")
        frozen = jax.lax.stop_gradient(frozen)
        under = t < self.cfg.max_timestep  # (b,)
        z = jnp.where(under[:, None, None, None], x0_hat, jax.lax.stop_gradient(z0))
        vqgan = nnx.merge(self.vqgan_graphdef, frozen["vqgan"])
        images = vqgan.decode(z * frozen["std"] + frozen["mean"])  # (b, S, S, 3) ~[-1, 1]
        s = self.image_size
        if images.shape[1:3] != (s, s):
            images = jax.image.resize(images, (b, s, s, images.shape[-1]), "bilinear")
        groups = b // LIP_FRAMES
        frames = images.reshape(groups, LIP_FRAMES, s, s, images.shape[-1])
        centre = audio.reshape(groups, LIP_FRAMES, *audio.shape[1:])[:, CENTRE]
        expert = nnx.merge(self.expert_graphdef, frozen["expert"])
        distance = sync_distance(expert.embed_lips(frames), expert.embed_audio(centre))  # (g,)
        share = under.reshape(groups, LIP_FRAMES).mean(axis=1).astype(jnp.float32)
        loss = self.cfg.weight * jnp.sum(share * distance) / groups
        judged = jnp.sum(share > 0)
        metrics = {
            "sync_loss": loss,
            "sync_distance": jnp.sum(jnp.where(share > 0, distance, 0.0)) / jnp.maximum(judged, 1),
            "sync_share": jnp.mean(under.astype(jnp.float32)),
        }
        return loss, metrics

    def add_to(
        self, loss: Array, aux: dict[str, Any], batch: Any, frozen: Any
    ) -> tuple[Array, dict[str, Any]]:
        """The DiT's (loss, aux) (`dit_step.dit_loss`) with the sync term added; aux gains
        its metrics."""
        t = aux["t"]
        if "drop_audio" in aux:  # no sync asked of a frame generated without its audio
            t = jnp.where(aux["drop_audio"], self.cfg.max_timestep, t)
        extra, metrics = self(frozen, self.x0_hat(aux), batch["latent"], t, batch["audio"])
        return loss + extra, dict(aux) | metrics


def build(
    cfg: SyncLossConfig,
    latents_dir: str | os.PathLike,
    diffusion_config: DiffusionConfig,
    replicated: jax.sharding.Sharding,
) -> tuple[SyncLoss, Any]:
    """(SyncLoss, frozen pytree on `replicated`) from the expert's and the frame VQGAN's
    workdirs and the stage-2 dataset's latent statistics."""
    from dithead_jax.data.records import dataset_metadata
    from dithead_jax.training.sync_expert_train import load_expert
    from dithead_jax.training.vqgan_train import load_model

    if not cfg.expert_workdir or not cfg.vqgan_workdir:
        raise ValueError(
            "sync_loss.weight > 0 needs sync_loss.expert_workdir (a configs/sync_expert.py "
            "run) and sync_loss.vqgan_workdir (the frame VQGAN the latents came from)"
        )
    expert, expert_run = load_expert(cfg.expert_workdir)
    vqgan = load_model(cfg.vqgan_workdir)
    provenance = dataset_metadata(latents_dir).get("provenance", {})
    if "latent_mean" not in provenance:
        raise ValueError(f"{latents_dir}: no latent statistics in its metadata (re-encode it)")
    expert_def, expert_state = nnx.split(expert)
    vqgan_def, vqgan_state = nnx.split(vqgan)
    frozen = {
        "expert": expert_state,
        "vqgan": vqgan_state,
        "mean": np.asarray(provenance["latent_mean"], np.float32),
        "std": np.asarray(provenance["latent_std"], np.float32),
    }
    loss = SyncLoss(
        cfg=cfg,
        expert_graphdef=expert_def,
        vqgan_graphdef=vqgan_def,
        schedule=diffusion.make_schedule(diffusion_config),
        prediction=diffusion_config.prediction,
        image_size=expert_run.model.image_size,
    )
    return loss, jax.device_put(frozen, replicated)
