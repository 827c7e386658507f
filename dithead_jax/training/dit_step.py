"""Stage 2: the DiT's loss, its jitted train step, a denoising preview and its FLOP count.

A stage-2 batch (from `data/pipelines.dit_dataset`, made global by `make_global_batch`):

    latent            (B, h, w, C)  z_0, the target frame's pre-quantisation latent
    masked_latent     (B, h, w, C)  z_m, the masked frame's latent
    reference_latent  (B, h, w, C)  z_r, a frame of the same video >= 60 frames away
    audio             (B, W, D)     the 11 x 33 audio window
    mask              (B, h, w)     lower-face alpha on the latent grid (only with
                                    DiffusionConfig.mask_weight > 0)

The model sees channels-last concat [z_t, z_m, z_r] (B, h, w, 3C) and predicts eps (or v).

The step follows the maxtext pattern: `nnx.split` happened once (the GraphDef is static),
the step is a pure function of (TrainState, batch) under a plain `jax.jit`, and the module
is rebuilt with `nnx.merge` inside the trace, so a call costs no Python graph traversal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from dithead_jax import sharding
from dithead_jax.config import CONDITION_LANDMARKS, DiffusionConfig, DiTConfig, TrainConfig
from dithead_jax.data import masks
from dithead_jax.diffusion import schedule as diffusion
from dithead_jax.training.state import (
    StateSetup,
    TrainState,
    apply_gradients,
    guard_update,
    learning_rate_schedule,
)

Array = jax.Array
Batch = Mapping[str, Array]
Metrics = dict[str, Array]
BATCH_KEYS = ("latent", "masked_latent", "reference_latent", "audio")


def batch_keys(
    diffusion_config: DiffusionConfig, model_config: DiTConfig | None = None
) -> tuple[str, ...]:
    """The batch entries a step reads: BATCH_KEYS, plus the mask for a mask-weighted loss
    and the landmarks for a DiT with landmark tokens."""
    keys = BATCH_KEYS + (("mask",) if diffusion_config.mask_weight else ())
    if model_config is not None and model_config.landmark_tokens:
        keys += ("landmarks",)
    return keys


def conditions(batch: Batch) -> dict[str, Array]:
    """The DiT's keyword conditions a batch carries: `landmarks` when present."""
    return {"landmarks": batch["landmarks"]} if "landmarks" in batch else {}


def model_input(z_t: Array, batch: Batch) -> Array:
    """[z_t, z_m, z_r] concatenated on channels: (B, h, w, C) x 3 -> (B, h, w, 3C)."""
    return jnp.concatenate([z_t, batch["masked_latent"], batch["reference_latent"]], axis=-1)


def dit_loss(
    model: nnx.Module,
    batch: Batch,
    rng: Array,
    schedule: diffusion.Schedule,
    prediction: diffusion.Prediction,
    mask_weight: float = 0.0,
    audio_dropout: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Denoising MSE for one batch: t ~ U[0, T), eps ~ N(0, I), z_t = q_sample(z_0, t, eps),
    weighted 1 + mask_weight * alpha inside the lower-face mask when mask_weight > 0.

    With audio_dropout > 0 each example's audio is replaced by the model's learned null
    context with that probability (classifier-free guidance). The coin comes from
    fold_in(rng, 1), so t and eps (drawn from `rng` itself) are those of a run without
    dropout; at 0 no coin is drawn and the loss is exactly the plain one.

    Returns (scalar loss, aux) as `diffusion.training_loss` does, plus aux["drop_audio"]
    (B,) bool with audio dropout.
    """
    kwargs = conditions(batch)
    if audio_dropout:  # else the model call is the plain one (stand-ins need no drop_audio)
        n = batch["latent"].shape[0]
        kwargs["drop_audio"] = jax.random.bernoulli(jax.random.fold_in(rng, 1), audio_dropout, (n,))

    def model_fn(z_t: Array, t: Array) -> Array:
        return model(model_input(z_t, batch), t, batch["audio"], **kwargs)

    weights = None
    if mask_weight:
        if "mask" not in batch:
            raise ValueError("diffusion.mask_weight > 0 needs batches with a 'mask'")
        weights = masks.loss_weights(jnp.asarray(batch["mask"], jnp.float32), mask_weight)
    loss, aux = diffusion.training_loss(
        model_fn, schedule, batch["latent"], rng, prediction, weights=weights
    )
    if "drop_audio" in kwargs:  # which examples were denoised without their audio
        aux["drop_audio"] = kwargs["drop_audio"]
    return loss, aux


def make_train_step(
    setup: StateSetup,
    diffusion_config: DiffusionConfig,
    train_config: TrainConfig,
    sync: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The un-jitted step: (state, global batch) -> (new state, scalar metrics).

    `sync`: a `training.sync_loss.SyncLoss` adds the trained expert's loss; the step then
    takes a third argument, its frozen weights (never in the state; see that module).

    The per-step randomness is `fold_in(key(seed), step)`, a pure function of the state, so
    a resumed run draws exactly the noise an uninterrupted one would. A non-finite loss,
    gradient or updated parameter leaves the state untouched (`state.guard_update`; the
    loop then stops): donated buffers would
    otherwise carry NaNs into the only copy of the weights.
    """
    schedule = diffusion.make_schedule(diffusion_config)
    lr_schedule = learning_rate_schedule(train_config)
    graphdef, tx = setup.graphdef, setup.tx
    base_key = jax.random.key(train_config.seed)

    def step_fn(state: TrainState, batch: Batch, frozen: Any = None) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(base_key, state.step)

        def loss_of(params: nnx.State) -> tuple[Array, dict[str, Array]]:
            model = nnx.merge(graphdef, params)
            loss, aux = dit_loss(
                model,
                batch,
                rng,
                schedule,
                diffusion_config.prediction,
                diffusion_config.mask_weight,
                diffusion_config.audio_dropout,
            )
            if sync is not None:
                loss, aux = sync.add_to(loss, aux, batch, frozen)
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        new_state = apply_gradients(state, grads, tx, train_config)
        params = new_state.params
        grad_norm = optax.global_norm(grads)
        new_state, guard = guard_update(new_state, state, loss, grad_norm)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
            "lr": lr_schedule(state.step),
        } | guard
        metrics |= {k: v for k, v in aux.items() if k.startswith("sync_")}
        return new_state, metrics

    return step_fn


def jit_train_step(
    step_fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    setup: StateSetup,
    batch_sharding: NamedSharding,
    compiler_options: Mapping[str, Any] | None = None,
    with_frozen: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`jax.jit` with explicit shardings; the old state is donated (updated in place).
    with_frozen: the step takes a third, replicated argument (the sync loss's weights).

    `compiler_options`: XLA options for this one computation (tests use
    `FAST_COMPILE_CPU` to cut CPU compile time ~2.5x; numerics are unchanged).
    """
    mesh = batch_sharding.mesh
    return jax.jit(
        step_fn,
        in_shardings=(setup.shardings, batch_sharding)
        + ((sharding.replicated(mesh),) if with_frozen else ()),
        out_shardings=(setup.shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=dict(compiler_options) if compiler_options else None,
    )


# LLVM at -O0 on the CPU backend: what dominates compiling these small test models.
FAST_COMPILE_CPU = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ---------------------------------------------------------------------------------------
# Preview: one-step denoising of a fixed batch at fixed noise levels


def preview_timesteps(count: int, num_timesteps: int) -> Array:
    """(count,) timesteps spread over (0, T): low noise on the first row, high on the last."""
    return jnp.round((jnp.arange(count) + 0.5) / count * (num_timesteps - 1)).astype(jnp.int32)


def make_preview(
    setup: StateSetup,
    diffusion_config: DiffusionConfig,
    batch_sharding: NamedSharding,
    count: int,
    seed: int = 0,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[TrainState, Batch], dict[str, Array]]:
    """jitted (state, global batch) -> the first `count` examples' latents, all (n, h, w, C):

        latent, masked_latent, reference_latent   the conditioning and the answer
        noisy                                      z_t at `preview_timesteps` (fixed noise)
        denoised, denoised_ema                     x0 predicted by the params / EMA params

    The noise comes from a fixed key, so successive previews differ only by the weights.
    """
    schedule = diffusion.make_schedule(diffusion_config)
    prediction = diffusion_config.prediction
    graphdef = setup.graphdef

    def preview(state: TrainState, batch: Batch) -> dict[str, Array]:
        z0 = batch["latent"][:count]
        n = z0.shape[0]
        sub = {k: v[:count] for k, v in batch.items()}
        t = preview_timesteps(n, schedule.num_timesteps)
        noise = jax.random.normal(jax.random.key(seed), z0.shape, z0.dtype)
        z_t = diffusion.q_sample(schedule, z0, t, noise)
        out = dict(sub, noisy=z_t)
        for name, params in (("denoised", state.params), ("denoised_ema", state.ema_params)):
            model = nnx.merge(graphdef, params)
            pred = model(model_input(z_t, sub), t, sub["audio"], **conditions(sub))
            pred = pred[..., : z0.shape[-1]]
            out[name], _ = diffusion.to_x0_and_eps(prediction, schedule, z_t, t, pred)
        out.pop("audio")
        out.pop("landmarks", None)
        return out

    return jax.jit(
        preview,
        in_shardings=(setup.shardings, batch_sharding),
        out_shardings=sharding.replicated(batch_sharding.mesh),
        compiler_options=dict(compiler_options) if compiler_options else None,
    )


# ---------------------------------------------------------------------------------------
# FLOPs (analytic, for MFU)


def dit_forward_flops(cfg: DiTConfig) -> float:
    """Matmul FLOPs of one forward pass for one example (2 per multiply-add).

    Counts every dense projection and both attention products; ignores norms, activations,
    softmax and adds (<2% at 1024 tokens). A training step costs 3x this (forward +
    backward's two matmuls per forward matmul): model FLOPs, so rematerialisation does not
    inflate MFU. `bench/dit.py` checks the count against XLA's compiled cost analysis.
    """
    d, p = cfg.hidden_size, cfg.patch_size
    tokens = (cfg.input_size // p) ** 2
    c_in, c_out = 3 * cfg.latent_channels, cfg.latent_channels * (2 if cfg.learn_sigma else 1)
    mlp = int(d * cfg.mlp_ratio)
    flops = 2 * tokens * p * p * c_in * d  # patchify
    flops += 2 * 256 * d + 2 * d * d  # timestep MLP
    block = 2 * d * 6 * d  # adaLN modulation (one vector per example)
    block += 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d
    block += 2 * 2 * tokens * d * mlp
    if cfg.cross_attention:
        if cfg.context_layout == "audio_tokens":
            keys, width = cfg.audio_window + 1, d
            flops += 2 * cfg.audio_window * cfg.audio_dim * d
        else:
            keys, width = 1, 2 * d
            flops += 2 * cfg.audio_window * cfg.audio_dim * d
        if cfg.landmark_tokens:  # the landmark MLP, and one more key in every block
            keys += 1
            flops += 2 * 2 * len(CONDITION_LANDMARKS) * d + 2 * d * width
        if cfg.audio_filter:  # self-attention over the W audio tokens, once per example
            w = cfg.audio_window
            flops += 2 * w * d * 3 * d + 2 * 2 * w * w * d + 2 * w * d * d
        block += 2 * tokens * d * d + 2 * keys * width * 2 * d  # q, k/v
        block += 2 * 2 * tokens * keys * d + 2 * tokens * d * d  # scores, values, out
    flops += cfg.depth * block
    flops += 2 * d * 2 * d + 2 * tokens * d * p * p * c_out  # final layer
    return float(flops)


def dit_train_flops(cfg: DiTConfig, batch_size: int) -> float:
    """Model FLOPs of one training step on `batch_size` examples (3x forward)."""
    return 3.0 * batch_size * dit_forward_flops(cfg)
