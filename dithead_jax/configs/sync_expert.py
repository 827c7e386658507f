"""Sync-expert run configs: `get_config("testing" | "demo" | "hdtf")`.

Sections map onto `dithead_jax.config`: `model` -> SyncExpertConfig, `train` ->
TrainConfig, `data` -> DataConfig; `mesh` as in configs/dit.py. `stage` is "sync_expert"
(train.py dispatches on it). The learning rate is `train.learning_rate` (AdamW).

    python train.py --config configs/sync_expert.py:demo --workdir W --config.data.dir=STAGE1
"""

import ml_collections

from dithead_jax import config as cfg


def _section(instance) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(cfg.to_dict(instance))


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.stage = "sync_expert"
    if arg == "testing":
        model = cfg.SyncExpertConfig(
            image_size=32, lip_channels=(8, 16), audio_channels=(16,), embed_dim=16
        )
        train = cfg.TrainConfig(
            global_batch_size=8, num_steps=6, learning_rate=3e-3, ema_decay=0.9,
            log_every=2, image_every=0, checkpoint_every=3,
        )  # fmt: skip
        data = cfg.DataConfig(image_size=32)
    elif arg == "demo":
        # 64^2 crops of demo.py. Sized for ~60 s of the demo's two cores (see README).
        model = cfg.SyncExpertConfig(image_size=64)
        train = cfg.TrainConfig(
            global_batch_size=32, num_steps=300, learning_rate=1e-3, ema_decay=0.99,
            ema_warmup=True, log_every=25, image_every=0, checkpoint_every=100,
        )  # fmt: skip
        data = cfg.DataConfig(image_size=64)
    elif arg == "hdtf":
        # 256^2 crops (the paper's): lower half 128 x 256 -> (2, 4) after six stride-2
        # stages; a wider embedding, SyncNet-like batch.
        model = cfg.SyncExpertConfig(
            image_size=256,
            lip_channels=(32, 64, 128, 256, 512, 512),
            audio_channels=(128, 256, 256),
            embed_dim=512,
            temperature=0.07,
        )
        train = cfg.TrainConfig(
            global_batch_size=128, num_steps=100_000, learning_rate=1e-4, ema_decay=0.999,
            log_every=100, image_every=0, checkpoint_every=5_000,
        )  # fmt: skip
        data = cfg.DataConfig(image_size=256)
    else:
        raise ValueError(f"unknown sync-expert config {arg!r}: testing, demo or hdtf")
    config.model = _section(model)
    config.train = _section(train)
    config.mesh = "dp"
    config.data = _section(data)
    config.data.dir = ""  # stage-1 frame records (data/preprocess.py)
    return config
