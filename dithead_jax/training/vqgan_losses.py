"""Stage-1 losses as pure functions of NNX modules (taming `VQLPIPSWithDiscriminator`).

Generator (encoder, quantiser, decoder):

    L_rec = pixel_weight * mean|x - x_rec| + perceptual_weight * mean LPIPS(x, x_rec)
    L_gan = -mean D(x_rec)
    lambda = sg( clip(||grad_W L_rec|| / (||grad_W L_gan|| + 1e-4), 0, 1e4) ) * disc_weight
    L = L_rec + lambda * disc_factor(step) * L_gan + codebook_weight * L_vq

with W the kernel of the decoder's last conv and disc_factor(step) = disc_factor once
step >= disc_start, else 0. Discriminator: hinge,
0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) * disc_factor(step).

The adaptive weight, functionally. PyTorch calls `autograd.grad(loss, last_layer.weight)`
on the live graph. Here the decoder is split at its last conv (`Decoder.features` gives its
input h), and each gradient is a separate `jax.grad` of
    W -> loss(conv_out_W(sg(h)))
w.r.t. the kernel only, evaluated at sg(W). That is exact, not an approximation: the
gradient w.r.t. a conv kernel depends on the rest of the network only through the conv's
input h and the loss's gradient w.r.t. the conv's output, and neither changes when h is a
constant. The inner grads cost one extra forward/backward of LPIPS and of D on x_rec
(XLA may share the forwards with the outer pass: stop_gradient is the identity there),
never a second pass through the VQGAN. The whole GAN branch -- D on x_rec and both inner
grads -- sits in a `lax.cond` on `step >= disc_start`, so warm-up steps skip it.

A train step (see tests/test_vqgan_training.py for a runnable one):
  1. (loss, aux), g = value_and_grad(vqgan_generator_loss, has_aux=True) w.r.t. the VQGAN's
     params; Adam update (`optimizer(cfg, global_batch)`).
  2. codebook, age, n_reset = vqgan.refresh_codebook(codebook, age, aux["indices"],
     aux["latents"], key, cfg.dead_code_steps); age: (K,) int32 carried by the loop.
  3. discriminator_loss(disc, batch, aux["reconstructions"], step, cfg): grad, Adam update.
Trace it inside `nnx.logical_axis_rules(sharding.VQGAN_RULES)` on the mesh so that the
models' activation constraints apply (`vqgan.constrain`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float

from dithead_jax.config import TrainConfig, VQGANLossConfig
from dithead_jax.data import masks
from dithead_jax.models.discriminator import NLayerDiscriminator
from dithead_jax.models.lpips import LPIPS
from dithead_jax.models.vqgan import VQGAN, constrain
from dithead_jax.training.state import learning_rate_schedule

Batch = Mapping[str, Array] | Array
ImageLoss = Callable[[Float[Array, "b h w c"]], jax.Array]


def images_of(batch: Batch) -> Float[Array, "b h w c"]:
    """The stage-1 pipeline yields {"image": (B, S, S, 3) in [-1, 1]}; a bare array works."""
    images = batch["image"] if isinstance(batch, Mapping) else batch
    return jnp.asarray(images, jnp.float32)


def l1_weights(batch: Batch, cfg: VQGANLossConfig) -> Float[Array, "b h w 1"] | None:
    """Per-pixel L1 weights 1 + mask_weight * alpha with mean 1 over the batch (so the
    loss keeps its scale and the learning rate its meaning), or None for plain L1."""
    if not cfg.mask_weight:
        return None
    if not isinstance(batch, Mapping) or "mask" not in batch:
        raise ValueError("loss.mask_weight > 0 needs batches with a 'mask' (alpha in [0, 1])")
    return masks.loss_weights(jnp.asarray(batch["mask"], jnp.float32), cfg.mask_weight)


def disc_factor(step: jax.Array | int, cfg: VQGANLossConfig) -> jax.Array:
    """cfg.disc_factor from `disc_start` on, 0 before (taming's `adopt_weight`)."""
    return jnp.where(jnp.asarray(step) >= cfg.disc_start, cfg.disc_factor, 0.0)


def discriminator_model(cfg: VQGANLossConfig, *, rngs: nnx.Rngs, in_channels: int = 3):
    return NLayerDiscriminator(
        in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm, rngs=rngs
    )


def optimizer(cfg: VQGANLossConfig, train: TrainConfig) -> optax.GradientTransformation:
    """Adam(beta 0.5, 0.9) at LDM's batch-scaled rate; one instance each for the VQGAN
    and the discriminator (the same lr, as LDM's lr_g_factor = 1). Warm-up and decay
    follow `train` (`state.learning_rate_schedule`); LDM's is constant."""
    peak = cfg.learning_rate(train.global_batch_size)
    constant = train.lr_decay == "constant" and train.warmup_steps == 0
    # A plain float keeps the optimiser state of runs saved before schedules existed (a
    # schedule adds a step counter to it, and their checkpoints would no longer restore).
    schedule = peak if constant else learning_rate_schedule(train, peak)
    return optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2)


# ---------------------------------------------------------------------------------------
# Adaptive weight


def last_layer_grad(conv: nnx.Conv, h: Array, loss_of_output: ImageLoss) -> jax.Array:
    """d loss(conv(h)) / d conv.kernel, with h, the kernel and the bias held constant
    (see the module doc for why that is the exact gradient)."""
    graphdef, params = nnx.split(conv)
    params = jax.lax.stop_gradient(params)
    h = jax.lax.stop_gradient(h)
    grads = jax.grad(lambda p: loss_of_output(nnx.merge(graphdef, p)(h)))(params)
    return grads["kernel"][...]


def adaptive_weight(
    conv: nnx.Conv,
    h: Array,
    rec_loss: ImageLoss,
    gan_loss: ImageLoss,
    max_weight: float = 1e4,
) -> jax.Array:
    """||grad_W rec_loss|| / (||grad_W gan_loss|| + 1e-4), clipped to [0, max_weight], no
    gradient (W = conv's kernel, both losses functions of conv(h))."""
    rec_norm = jnp.linalg.norm(last_layer_grad(conv, h, rec_loss))
    gan_norm = jnp.linalg.norm(last_layer_grad(conv, h, gan_loss))
    weight = jnp.clip(rec_norm / (gan_norm + 1e-4), 0.0, max_weight)
    return jax.lax.stop_gradient(weight)


# ---------------------------------------------------------------------------------------
# Generator and discriminator losses


def vqgan_generator_loss(
    model: VQGAN,
    disc: NLayerDiscriminator,
    lpips: LPIPS | Callable[[Array, Array], Array] | None,
    batch: Batch,
    step: jax.Array | int,
    cfg: VQGANLossConfig,
) -> tuple[jax.Array, dict[str, Any]]:
    """Generator loss and its aux, for `jax.grad(..., has_aux=True)` w.r.t. the VQGAN's
    params (the discriminator and LPIPS are only read).

    aux: "metrics" (float32 scalars for logging), "reconstructions" (B, H, W, 3), the
    discriminator step's fake input), "indices" (B, h, w) and "latents" (B, h, w, d, the
    pre-quantisation z) for `vqgan.refresh_codebook`; all without gradient.
    `lpips`: the perceptual distance, (B, H, W, 3) x2 -> (B,) (normally `load_lpips()`);
    may be None when cfg.perceptual_weight == 0.
    """
    x = images_of(batch)
    z = model.encode(x)
    h, vq = model.decode_features(z)
    conv_out = model.decoder.conv_out
    x_rec = constrain(conv_out(h)).astype(jnp.float32)

    pixel_weights = l1_weights(batch, cfg)

    def reconstruction(images: Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        error = jnp.abs(x - images)
        l1 = jnp.mean(error if pixel_weights is None else error * pixel_weights)
        if cfg.perceptual_weight:
            if lpips is None:
                raise ValueError("perceptual_weight > 0 needs an LPIPS module")
            perceptual = jnp.mean(lpips(x, images))
        else:
            perceptual = jnp.zeros((), jnp.float32)
        return cfg.pixel_weight * l1 + cfg.perceptual_weight * perceptual, (l1, perceptual)

    def generator_gan(images: Array) -> jax.Array:
        return -jnp.mean(disc(images.astype(jnp.float32)).astype(jnp.float32))

    nll, (l1, perceptual) = reconstruction(x_rec)

    def gan_terms(_: None) -> tuple[jax.Array, jax.Array]:
        weight = adaptive_weight(
            conv_out,
            h,
            lambda images: reconstruction(images.astype(jnp.float32))[0],
            generator_gan,
            cfg.adaptive_weight_max,
        )
        return generator_gan(x_rec), weight * cfg.disc_weight

    def no_gan(_: None) -> tuple[jax.Array, jax.Array]:
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)

    factor = disc_factor(step, cfg)
    g_loss, d_weight = jax.lax.cond(factor > 0, gan_terms, no_gan, None)
    loss = nll + d_weight * factor * g_loss + cfg.codebook_weight * vq.loss

    metrics = {
        "loss": loss,
        "rec_loss": nll,
        "l1": l1,
        "lpips": perceptual,
        "quantizer_loss": vq.loss,
        "codebook_loss": vq.codebook_loss,
        "commitment_loss": vq.commitment_loss,
        "g_loss": g_loss,
        "d_weight": d_weight,
        "disc_factor": factor,
        "perplexity": vq.perplexity,
        "codebook_usage": vq.usage,
    }
    aux = {
        "metrics": jax.lax.stop_gradient(metrics),
        "reconstructions": jax.lax.stop_gradient(x_rec),
        "indices": vq.indices,
        "latents": jax.lax.stop_gradient(z),
    }
    return loss, aux


def discriminator_loss(
    disc: NLayerDiscriminator,
    batch: Batch,
    reconstructions: Float[Array, "b h w c"],
    step: jax.Array | int,
    cfg: VQGANLossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Hinge loss of D on real frames vs. (gradient-free) reconstructions, x disc_factor.

    Real and fake go through D in separate calls, as in taming (with batch-statistics
    norm each set is normalised by its own statistics)."""
    real = jax.lax.stop_gradient(images_of(batch))
    fake = jax.lax.stop_gradient(jnp.asarray(reconstructions, jnp.float32))
    logits_real = disc(real).astype(jnp.float32)
    logits_fake = disc(fake).astype(jnp.float32)
    hinge = 0.5 * (
        jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))
    )
    factor = disc_factor(step, cfg)
    loss = factor * hinge
    metrics = {
        "disc_loss": loss,
        "hinge": hinge,
        "logits_real": jnp.mean(logits_real),
        "logits_fake": jnp.mean(logits_fake),
    }
    return loss, jax.lax.stop_gradient(metrics)
