"""Stage-2 (DiT) run configs: `get_config("testing" | "S_2" | "B_2" | "L_2" | "XL_2" | ...)`.

Sections map one-to-one onto the typed dataclasses in `dithead_jax.config` (`model` ->
DiTConfig, `diffusion` -> DiffusionConfig, `train` -> TrainConfig, `mesh` -> MeshConfig,
`data` -> DataConfig) except `mesh`, a string: a preset (`dp`, `fsdp`, `fsdp_tp`) or axis
sizes (`data=2,fsdp=-1,tensor=2`), read by `dithead_jax.sharding.mesh_config`. Override any
field on the command line with `--config.<field>=...`, e.g.

    python train.py --config configs/dit.py:L_2 --workdir W --config.data.dir=LATENTS \
        --config.mesh=fsdp --config.model.dtype=bfloat16

`model.dtype=bfloat16` is the mixed-precision switch: bf16 compute, float32 master weights,
optimizer state and EMA (`model.param_dtype` stays float32); L_2 and XL_2 default to it,
with scan over layers, remat and `attention_impl="auto"` (see the comment below).
"""

import ml_collections

from dithead_jax import config as cfg


def _section(instance) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(cfg.to_dict(instance))


def get_config(arg: str = "L_2") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.stage = "dit"
    diffusion = cfg.DiffusionConfig()
    if arg == "testing":
        model = cfg.DiTConfig.testing()
        train = cfg.TrainConfig(
            global_batch_size=8,
            num_steps=20,
            log_every=5,
            image_every=10,
            checkpoint_every=10,
            preview_count=4,
        )
        data = cfg.DataConfig(image_size=64, min_reference_distance=8)
    elif arg == "demo":
        # The CPU demo (demo.py): 64^2 crops -> 16x16x3 latents, 64 tokens, 6 x 128 wide;
        # ~4 steps/s at batch 16 on two cores (a step costs in proportion to the batch, and
        # at this scale updates, not examples, are what the audio path needs). EMA with
        # warm-up: a run this short must not average in its initialisation.
        # null_audio + audio_dropout: classifier-free guidance on the audio; sampled at
        # guidance 2, held-out sync 0.59 -> 0.67 and LSE-C 0.18 -> 0.23 (README "What
        # strengthens lip sync").
        model = cfg.DiTConfig.testing(hidden_size=128, depth=6, num_heads=4, null_audio=True)
        train = cfg.TrainConfig(
            global_batch_size=16,
            num_steps=1000,
            learning_rate=2e-3,
            warmup_steps=50,
            grad_clip_norm=1.0,
            ema_decay=0.995,
            ema_warmup=True,
            log_every=25,
            image_every=500,
            checkpoint_every=500,
            preview_count=4,
        )
        data = cfg.DataConfig(image_size=64, min_reference_distance=25)
        # v-prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v stays bounded at every t,
        # while an epsilon model's x0 estimate divides its error by sqrt(abar) (x156 at
        # t = 999). The x0_same_step reference chain feeds those estimates to the next
        # frame, and an under-trained epsilon model's blow up there.
        # mask_weight: the masked lower face is the only part the DiT must invent from audio
        # (~19% of the latent grid); weighted 9:1 it dominates the loss, and the audio path
        # forms within hundreds of steps instead of thousands. Held-out sync of the one-step
        # x0 at t = 999, batch 16: unweighted 0.15 after 1000 steps; weighted 0.55 after 800
        # at lr 1e-3, 0.68 after 800 at lr 2e-3.
        diffusion = cfg.DiffusionConfig(prediction="v", mask_weight=8.0, audio_dropout=0.1)
    elif arg in ("L_2", "XL_2"):
        # The paper's sizes, set up for real accelerators (bench/results/dit_memory.json,
        # 8 examples per device): bf16 compute with f32 master weights, scan over layers,
        # and remat that keeps the weight matmuls' outputs. That policy recomputes only the
        # attention products and elementwise ops (XLA's FLOPs for one scanned layer: +1% over
        # no remat, against +27% for full remat) and needs about half the temp memory of
        # dots_saveable: 23.8 GiB per device under dp, 12.8 under fsdp.
        model = cfg.DiTConfig.named(
            arg,
            dtype="bfloat16",
            scan_layers=True,
            remat_policy="dots_with_no_batch_dims_saveable",
            attention_impl="auto",
        )
        train = cfg.TrainConfig()
        data = cfg.DataConfig()
    else:
        model = cfg.DiTConfig.named(arg)
        train = cfg.TrainConfig()
        data = cfg.DataConfig()
    config.model = _section(model)
    config.diffusion = _section(diffusion)
    # The trained sync expert's loss (training/sync_loss.py); weight 0 = off (the paper).
    config.sync_loss = _section(cfg.SyncLossConfig())
    config.train = _section(train)
    config.mesh = "dp"
    config.data = _section(data)
    config.data.dir = ""  # stage-2 latent records (written by data/encode_latents.py)
    return config
