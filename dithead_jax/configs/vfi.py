"""Frame-interpolator (RIFE's IFNet) run configs: `get_config("testing" | "demo" | "hdtf")`.

Sections map onto `dithead_jax.config`: `model` -> IFNetConfig (presets in
models/ifnet.py), `loss` -> VFILossConfig, `triplets` -> TripletConfig (how training frame
triplets are drawn), `train` -> TrainConfig, `data` -> DataConfig; `mesh` as in
configs/dit.py. `stage` is "vfi" (train.py dispatches on it). `init_weights`: a released
Practical-RIFE flownet.pkl (a path, or a name in $DITHEAD_WEIGHTS) that a fresh run starts
from; "" = random init. Optimiser: AdamW with RIFE's weight decay (1e-4) and its schedule
shape (linear warm-up, cosine decay).

    python train.py --config configs/vfi.py:demo --workdir W --config.data.dir=STAGE1
"""

import ml_collections

from dithead_jax import config as cfg


def _section(instance) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(cfg.to_dict(instance))


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    from dithead_jax.models import ifnet  # jax and flax: only once a variant is asked for

    config = ml_collections.ConfigDict()
    config.variant = arg
    config.stage = "vfi"
    config.init_weights = ""
    loss = cfg.VFILossConfig()
    triplets = cfg.TripletConfig()
    if arg == "testing":
        model = ifnet.TESTING
        train = cfg.TrainConfig(
            global_batch_size=8, num_steps=6, learning_rate=3e-3, ema_decay=0.9,
            log_every=2, image_every=0, checkpoint_every=3, preview_count=2,
        )  # fmt: skip
        data = cfg.DataConfig(image_size=32)
    elif arg == "demo":
        # demo.py's 64^2 crops, from scratch, sized for <= ~120 s of the demo's two cores.
        # Measured 2026-12-02 (bench/vfi.py --train, 8-identity synthetic set, shared and
        # noisy machine): 5.7 steps/s at batch 8 (3.5-4 under heavier load),
        # 300 steps in 99 s of wall time, ~50 s of it start-up and the ~32-s XLA compile of
        # the step. Held-out PSNR 33.53 dB vs 33.52 for (I0 + I1) / 2 and 30.97 for
        # repeating I0: at this budget the interpolator learns the blend, not yet flows.
        model = ifnet.DEMO
        # Earlier blocks supervised too: the stand-in for the distillation we leave out.
        loss = cfg.VFILossConfig(block_weight=0.5)
        train = cfg.TrainConfig(
            global_batch_size=8, num_steps=300, learning_rate=1e-3, weight_decay=1e-4,
            warmup_steps=20, lr_decay="cosine", ema_decay=0.999, ema_warmup=True,
            log_every=25, image_every=150, checkpoint_every=150, preview_count=6,
        )  # fmt: skip
        data = cfg.DataConfig(image_size=64)
    elif arg == "hdtf":
        # The paper's 256^2 crops: the released Practical-RIFE 4.25 weights fine-tuned on
        # talking heads at a low rate (RIFE trains from scratch at 3e-4), with wider spans
        # (t in {1/4, 1/3, 1/2, 2/3, 3/4}) so that arbitrary t keeps working.
        config.init_weights = "rife_flownet.pkl"
        model = ifnet.RELEASED
        triplets = cfg.TripletConfig(spans=(2, 3, 4))
        train = cfg.TrainConfig(
            global_batch_size=32, num_steps=20_000, learning_rate=2e-5, weight_decay=1e-4,
            warmup_steps=500, lr_decay="cosine", ema_decay=0.999,
            log_every=100, image_every=2_000, checkpoint_every=2_000,
        )  # fmt: skip
        data = cfg.DataConfig(image_size=256)
    else:
        raise ValueError(f"unknown frame-interpolator config {arg!r}: testing, demo or hdtf")
    config.model = _section(model)
    config.loss = _section(loss)
    config.triplets = _section(triplets)
    config.train = _section(train)
    config.mesh = "dp"
    config.data = _section(data)
    config.data.dir = ""  # stage-1 frame records (data/preprocess.py)
    return config
