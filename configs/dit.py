"""Stage-2 (DiT) run configs: `get_config("testing" | "S_2" | "B_2" | "L_2" | "XL_2" | ...)`.

Sections map one-to-one onto the typed dataclasses in `dithead_jax.config` (`model` ->
DiTConfig, `diffusion` -> DiffusionConfig, `train` -> TrainConfig, `mesh` -> MeshConfig,
`data` -> DataConfig); override any field on the command line with `--config.<field>=...`.
"""

import dataclasses

import ml_collections

from dithead_jax import config as cfg


def _section(instance) -> ml_collections.ConfigDict:
    values = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(instance).items()
    }
    return ml_collections.ConfigDict(values)


def get_config(arg: str = "L_2") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = arg
    if arg == "testing":
        model = cfg.DiTConfig.testing()
        train = cfg.TrainConfig(
            global_batch_size=8, num_steps=20, log_every=5, image_every=10, checkpoint_every=10
        )
        data = cfg.DataConfig(image_size=64, min_reference_distance=8)
    else:
        model = cfg.DiTConfig.named(arg)
        train = cfg.TrainConfig()
        data = cfg.DataConfig()
    config.model = _section(model)
    config.diffusion = _section(cfg.DiffusionConfig())
    config.train = _section(train)
    config.mesh = _section(cfg.MeshConfig.preset("dp"))
    config.data = _section(data)
    config.data.dir = ""  # stage-2 latent records (written by data/encode_latents.py)
    return config
