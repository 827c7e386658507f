"""VQGAN losses: adaptive weight against a direct computation, the disc_start switch, and a
short optax run on synthetic frames (the real trainer lives in dithead_jax/training)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dithead_jax.config import SyntheticConfig, TrainConfig, VQGANConfig, VQGANLossConfig
from dithead_jax.models.vqgan import VQGAN, refresh_codebook
from dithead_jax.synthetic.dataset import render_synthetic_clip
from dithead_jax.training import vqgan_losses as losses

LOSS_CFG = VQGANLossConfig(disc_start=3, disc_channels=16, base_learning_rate=2e-4)


def fast_rngs(seed: int) -> nnx.Rngs:
    # XLA's RngBitGenerator: first-time eager init compiles far less than threefry.
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """(32, 32, 32, 3) synthetic talking-face frames in [-1, 1], two identities."""
    cfg = SyntheticConfig(size=32, seconds=0.64, identities=2)
    clips = [render_synthetic_clip(cfg, i, 0)[0].frames for i in range(2)]
    return np.concatenate(clips).astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def nets():
    model = VQGAN(VQGANConfig.testing(), rngs=fast_rngs(0))
    disc = losses.discriminator_model(LOSS_CFG, rngs=fast_rngs(1))
    return nnx.split(model, nnx.Param), nnx.split(disc, nnx.Param)


def perceptual_stand_in(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """A cheap, smooth, per-image "LPIPS" (squared distance of 2x2-pooled images): the loss
    only needs a differentiable (B,) distance, and VGG16's backward pass would dominate the
    compile time of this file. The real LPIPS is tested in test_lpips.py."""
    pool = lambda x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, 3).mean((2, 4))
    return jnp.mean((pool(x0) - pool(x1)) ** 2, axis=(1, 2, 3))


def test_adaptive_weight_matches_direct_gradients(nets, frames):
    """d_weight from the split-decoder inner grads == the ratio of the gradient norms that
    a plain jax.grad of each loss w.r.t. the full VQGAN gives for decoder.conv_out.kernel
    (L_rec with a perceptual term, so that path is covered too)."""
    (g, params), (gd, dparams) = nets
    lpips = perceptual_stand_in
    cfg = LOSS_CFG
    x = jnp.asarray(frames[:4])

    @jax.jit
    def run(params, dparams, step):
        model, disc = nnx.merge(g, params), nnx.merge(gd, dparams)
        loss, aux = losses.vqgan_generator_loss(model, disc, lpips, {"image": x}, step, cfg)

        def both(p):  # (L_rec, L_gan) of the reconstruction, through the whole VQGAN
            rec = nnx.merge(g, p)(x)[0]
            l_rec = jnp.mean(jnp.abs(x - rec)) + jnp.mean(lpips(x, rec))
            return jnp.stack([l_rec, -jnp.mean(disc(rec))])

        _, pullback = jax.vjp(both, params)
        kernel = lambda cot: pullback(jnp.asarray(cot))[0]["decoder"]["conv_out"]["kernel"][...]
        direct = jnp.linalg.norm(kernel([1.0, 0.0])) / (jnp.linalg.norm(kernel([0.0, 1.0])) + 1e-4)
        lpips_direct = jnp.mean(lpips(x, nnx.merge(g, params)(x)[0]))
        return loss, aux["metrics"], direct, lpips_direct

    loss, metrics, direct, lpips_direct = run(params, dparams, 5)
    assert metrics["disc_factor"] == 1.0
    assert np.isfinite(float(metrics["d_weight"])) and float(metrics["d_weight"]) > 0
    np.testing.assert_allclose(metrics["d_weight"], cfg.disc_weight * direct, rtol=2e-3)
    np.testing.assert_allclose(metrics["lpips"], lpips_direct, rtol=1e-4)
    expected = (
        metrics["rec_loss"]
        + metrics["d_weight"] * metrics["g_loss"]
        + cfg.codebook_weight * metrics["quantizer_loss"]
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_mask_weighted_l1(nets, frames):
    """mask_weight: L1 under pixel weights 1 + w * alpha normalised to mean 1, so a mask
    over half the image moves the loss towards that half's error; w = 0 is plain L1."""
    (g, params), (gd, dparams) = nets
    model, disc = nnx.merge(g, params), nnx.merge(gd, dparams)
    x = jnp.asarray(frames[:2])
    alpha = np.zeros(x.shape[:3], np.float32)
    alpha[:, x.shape[1] // 2 :] = 1.0  # the lower half
    error = np.abs(np.asarray(x - model(x)[0]))
    top, bottom = error[:, : x.shape[1] // 2].mean(), error[:, x.shape[1] // 2 :].mean()

    def l1(weight):
        cfg = dataclasses.replace(LOSS_CFG, mask_weight=weight, perceptual_weight=0.0)
        batch = {"image": x, "mask": jnp.asarray(alpha)}
        _, aux = losses.vqgan_generator_loss(model, disc, None, batch, 0, cfg)
        return float(aux["metrics"]["l1"])

    np.testing.assert_allclose(l1(0.0), (top + bottom) / 2, rtol=1e-4)
    # weights 1 (top) and 1 + 3 (bottom), mean 2.5: (top + 4 bottom) / 5
    np.testing.assert_allclose(l1(3.0), (top + 4 * bottom) / 5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs batches with a 'mask'"):
        cfg = dataclasses.replace(LOSS_CFG, mask_weight=1.0, perceptual_weight=0.0)
        losses.vqgan_generator_loss(model, disc, None, {"image": x}, 0, cfg)


def test_last_layer_grad_finite_difference():
    """The inner gradient against central differences on a conv of a smooth toy loss."""
    conv = nnx.Conv(4, 3, (3, 3), rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    loss = lambda y: jnp.mean((y - 0.3) ** 2) + jnp.mean(jnp.tanh(y) ** 2)
    graphdef, params = nnx.split(conv)

    @jax.jit
    def check(params, u):
        layer = nnx.merge(graphdef, params)
        grad = losses.last_layer_grad(layer, h, loss)

        def at(kernel):
            moved = jax.tree.map(lambda x: x, params)
            moved["kernel"] = moved["kernel"].replace(kernel)
            return loss(nnx.merge(graphdef, moved)(h))

        eps = 1e-2
        fd = (at(params["kernel"][...] + eps * u) - at(params["kernel"][...] - eps * u)) / (2 * eps)
        return jnp.vdot(grad, u), fd

    directional, fd = check(params, jax.random.normal(jax.random.key(2), (3, 3, 4, 3)))
    np.testing.assert_allclose(directional, fd, rtol=1e-3)


def test_vqgan_trains_on_synthetic_frames(nets, frames):
    """A few dozen Adam steps: the reconstruction improves, the codebook spreads out (dead
    codes re-seeded from encoder outputs), and the GAN terms switch on at disc_start."""
    (g, params), (gd, dparams) = nets
    cfg = dataclasses.replace(LOSS_CFG, perceptual_weight=0.0, dead_code_steps=2)
    tx = losses.optimizer(cfg, TrainConfig(global_batch_size=1))
    opt, dopt = tx.init(params), tx.init(dparams)
    age = jnp.zeros(VQGANConfig.testing().codebook_size, jnp.int32)

    @jax.jit
    def train_step(params, dparams, opt, dopt, age, batch, step, key):
        def gen_loss(p):
            model, disc = nnx.merge(g, p), nnx.merge(gd, dparams)
            return losses.vqgan_generator_loss(model, disc, None, batch, step, cfg)

        (_, aux), grads = jax.value_and_grad(gen_loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        codebook, age, reset = refresh_codebook(
            params["quantize"]["codebook"][...],
            age,
            aux["indices"],
            aux["latents"],
            key,
            cfg.dead_code_steps,
        )
        params["quantize"]["codebook"] = params["quantize"]["codebook"].replace(codebook)

        disc_loss = lambda d: losses.discriminator_loss(
            nnx.merge(gd, d), batch, aux["reconstructions"], step, cfg
        )
        (_, dmetrics), dgrads = jax.value_and_grad(disc_loss, has_aux=True)(dparams)
        dupdates, dopt = tx.update(dgrads, dopt, dparams)
        dparams = optax.apply_updates(dparams, dupdates)
        return params, dparams, opt, dopt, age, aux["metrics"] | dmetrics | {"reset": reset}

    rng = np.random.default_rng(0)
    history = []
    for step in range(40):
        batch = {"image": jnp.asarray(frames[rng.choice(len(frames), 8, replace=False)])}
        params, dparams, opt, dopt, age, metrics = train_step(
            params, dparams, opt, dopt, age, batch, step, jax.random.key(step)
        )
        history.append(jax.device_get(metrics))

    l1 = np.array([m["l1"] for m in history])
    usage = np.array([m["codebook_usage"] for m in history])
    assert all(np.isfinite(m["loss"]) for m in history)
    assert l1[-5:].mean() < 0.6 * l1[:3].mean(), l1
    assert usage[-5:].mean() > 2 * usage[:3].mean(), usage
    # GAN terms: exactly zero before disc_start, active after.
    for m in history[: cfg.disc_start]:
        assert m["g_loss"] == 0 and m["d_weight"] == 0 and m["disc_loss"] == 0
    assert all(m["disc_factor"] == 1 and m["d_weight"] > 0 for m in history[cfg.disc_start :])
    assert all(m["disc_loss"] > 0 for m in history[cfg.disc_start :])
    print(
        f"l1 {l1[:3].mean():.3f} -> {l1[-5:].mean():.3f}; usage {usage[:3].mean():.3f} -> "
        f"{usage[-5:].mean():.3f}; codes reset {sum(int(m['reset']) for m in history)}"
    )
