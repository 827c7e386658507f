"""Stage-1 (VQGAN) run configs: `get_config("testing" | "demo" | "f4_16384")`.

Sections map onto the typed dataclasses in `dithead_jax.config` (`model` -> VQGANConfig,
`loss` -> VQGANLossConfig, `train` -> TrainConfig, `data` -> DataConfig); `mesh` is a string
as in configs/dit.py (a preset `dp` / `fsdp` / `fsdp_tp`, or `data=2,fsdp=-1`). Top-level:

    stage      "vqgan" (train.py dispatches on it)
    target     "frames": the ground-truth VQGAN (E, D); "masked": the masked-frame encoder
               E_m, trained as a whole VQGAN on masked frames (its decoder is discarded)
    use_lpips  load the pretrained LPIPS-VGG16 for the perceptual term; False requires
               loss.perceptual_weight == 0 (tests, where VGG's backward dominates compile)
    crop       0: whole frames; N: random N x N windows (LDM trains its autoencoders on
               crops; a step costs (N / image_size)^2 as much)

    python train.py --config configs/vqgan.py:f4_16384 --workdir W --config.data.dir=FRAMES \
        [--config.target=masked] [--config.loss.disc_start=50001]

The learning rate is LDM's: loss.base_learning_rate x train.global_batch_size (the
`train.learning_rate` field is unused by this stage).
"""

import ml_collections

from dithead_jax import config as cfg


def _section(instance) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(cfg.to_dict(instance))


def get_config(arg: str = "f4_16384") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.stage = "vqgan"
    config.target = "frames"
    config.use_lpips = True
    config.crop = 0  # > 0: train on random crop x crop windows (multiple of the factor)
    if arg == "testing":
        # 32^2 frames -> 8x8x3 latents; seconds of CPU per step on 8 simulated devices.
        model = cfg.VQGANConfig.testing()
        loss = cfg.VQGANLossConfig(
            perceptual_weight=0.0,
            disc_start=10,
            disc_channels=16,
            base_learning_rate=2.5e-5,  # x batch 8 = 2e-4, what test_vqgan_training uses
            dead_code_steps=4,
        )
        train = cfg.TrainConfig(
            global_batch_size=8,
            num_steps=20,
            ema_decay=0.99,
            log_every=4,
            image_every=10,
            checkpoint_every=8,
            preview_count=4,
        )
        data = cfg.DataConfig(image_size=32)
        config.use_lpips = False
    elif arg == "demo":
        # The CPU demo (demo.py): 64^2 face crops, f=4 -> 16x16x3 latents. Sized for its
        # 15-minute budget on two cores: a few hundred steps of L1 + codebook terms at lr
        # 1e-3. The adversarial and LPIPS terms stay off (the
        # discriminator would start after the run ends; LPIPS-VGG's backward pass would
        # cost 2.5x the step), and dead codes are re-seeded after 10 idle steps.
        model = cfg.VQGANConfig.testing(
            ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=64, codebook_size=1024
        )
        loss = cfg.VQGANLossConfig(
            perceptual_weight=0.0,
            disc_start=10**9,
            disc_channels=32,
            base_learning_rate=1.25e-4,  # x batch 8 = 1e-3
            dead_code_steps=10,
            # L1 x5 inside the mouth mask (weight 1 + 4 alpha), the only region paste-back
            # keeps: held-out round trips then carry more of the mouth opening (expert
            # reading 0.46 -> 0.54 after 300 steps; whole-face PSNR 17.1 -> 16.2 dB).
            mask_weight=4.0,
        )
        train = cfg.TrainConfig(
            global_batch_size=8,
            num_steps=300,
            ema_decay=0.99,
            ema_warmup=True,
            log_every=25,
            image_every=100,
            checkpoint_every=100,
            preview_count=8,
        )
        data = cfg.DataConfig(image_size=64)
        config.use_lpips = False
        # Width 32 on random 32^2 windows: a step costs less than width 16 on whole frames
        # did (both VQGANs' 300 steps side by side: 208 s against 342 s), and the held-out
        # lower face comes back 2.3 dB closer (21.9 vs 19.6 dB; README "Faces").
        config.crop = 32
    elif arg == "f4_16384":
        # The paper's VQGAN (CompVis vq-f4 layout) at 256^2. DESIGN.md does not fix the
        # batch; 64 gives LDM's batch-scaled lr 4.5e-6 x 64 = 2.9e-4. disc_start as in
        # LDM's vq-f4 config (the GAN terms join once reconstructions are good).
        model = cfg.VQGANConfig.f4_16384()
        loss = cfg.VQGANLossConfig(disc_start=50_001)
        train = cfg.TrainConfig(
            global_batch_size=64,
            num_steps=200_000,
            ema_decay=0.9999,
            log_every=100,
            image_every=5_000,
            checkpoint_every=5_000,
        )
        data = cfg.DataConfig(image_size=256)
    else:
        raise ValueError(f"unknown VQGAN config {arg!r}: testing, demo or f4_16384")
    config.model = _section(model)
    config.loss = _section(loss)
    config.train = _section(train)
    config.mesh = "dp"
    config.data = _section(data)
    config.data.dir = ""  # stage-1 frame records (data/preprocess.py)
    return config
