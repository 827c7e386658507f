"""Known answers for loss terms whose value no other test pins (found by `make mutate`:
replacing a constant in them changed no test's outcome)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dithead_jax.config import VQGANLossConfig
from dithead_jax.training import vqgan_losses as losses


def test_discriminator_hinge_loss_by_hand():
    """taming's hinge: 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake))), x the factor
    from `disc_start` on. A stand-in D (logits = 4 x first channel) gives hand-computable
    logits on both sides of the hinges' kinks: real 0.1 / 0.5 -> 0.4 / 2.0, fake -0.5 / 0.1
    -> -2.0 / 0.4."""
    real = jnp.concatenate([jnp.full((1, 2, 2, 3), 0.1), jnp.full((1, 2, 2, 3), 0.5)])
    fake = jnp.concatenate([jnp.full((1, 2, 2, 3), -0.5), jnp.full((1, 2, 2, 3), 0.1)])

    def disc(x):
        return 4.0 * x[..., :1]

    # relu(1 - 0.4) = 0.6, relu(1 - 2.0) = 0; relu(1 - 2.0) = 0, relu(1 + 0.4) = 1.4.
    want = 0.5 * (np.mean([0.6, 0.0]) + np.mean([0.0, 1.4]))
    cfg = VQGANLossConfig(disc_start=10, disc_factor=0.5)
    loss, metrics = losses.discriminator_loss(disc, {"image": real}, fake, 10, cfg)
    assert float(metrics["hinge"]) == pytest.approx(want, rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * want, rel=1e-6)
    assert float(metrics["logits_real"]) == pytest.approx(1.2)
    assert float(metrics["logits_fake"]) == pytest.approx(-0.8)
    before, _ = losses.discriminator_loss(disc, {"image": real}, fake, 9, cfg)
    assert float(before) == 0.0
