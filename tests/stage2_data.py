"""Small record sets for training tests: stage-1 clips of given frames, and random stage-2
records (random arrays stand in for VQGAN latents)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # when run as a script

from dithead_jax.data import records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, path: str | Path):
    """The module a script file defines (a CLI's `main`, a config's `get_config`), loaded
    under `name` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dit_testing_config(data_dir: str | Path):
    """configs/dit.py:testing (an ml_collections ConfigDict) reading `data_dir`."""
    config = load_script("dit_config", ROOT / "configs" / "dit.py").get_config("testing")
    config.data.dir = str(data_dir)
    return config


def save_initial_run(config, workdir: Path, make_model, tx, rules) -> None:
    """A step-0 checkpoint of `config`'s model as train.py lays it out (state + config)."""
    import jax

    from dithead_jax import sharding
    from dithead_jax.training.checkpoint import Checkpointer
    from dithead_jax.training.dit_step import FAST_COMPILE_CPU
    from dithead_jax.training.loop import config_dict
    from dithead_jax.training.state import create_train_state

    mesh = sharding.make_mesh("dp", jax.devices()[:1])
    state, _ = create_train_state(
        make_model, tx, seed=0, mesh=mesh, rules=rules, compiler_options=FAST_COMPILE_CPU
    )
    ckpt = Checkpointer(workdir / "checkpoints", asynchronous=False)
    ckpt.save(0, state, config=config_dict(config))
    ckpt.close()


def save_initial_vqgan(stage1: Path, workdir: Path) -> None:
    """An untrained configs/vqgan.py:testing run on `stage1`, as train.py saves step 0."""
    from dithead_jax import sharding
    from dithead_jax.training import vqgan_train

    config = load_script("vqgan_config", ROOT / "configs" / "vqgan.py").get_config("testing")
    config.data.dir = str(stage1)
    run = vqgan_train.VQGANRun.from_config(config)
    save_initial_run(
        config, workdir,
        lambda rngs: vqgan_train.VQGANTrainer(run.model, run.loss, rngs=rngs),
        vqgan_train.make_optimizer(run), sharding.VQGAN_RULES,
    )  # fmt: skip


def save_initial_dit(config, workdir: Path) -> None:
    """An untrained DiT run of `config` (a dit.py ConfigDict), as train.py saves step 0."""
    from dithead_jax import sharding
    from dithead_jax.models.dit import DiT
    from dithead_jax.training import dit_train

    run = dit_train.DiTRun.from_config(config)
    save_initial_run(
        config, workdir, lambda rngs: DiT(run.model, rngs=rngs),
        dit_train.make_optimizer(run.train), sharding.DIT_RULES,
    )  # fmt: skip


def write_stage1_clip(
    out_dir: str | Path,
    frames: np.ndarray,
    mask: np.ndarray,
    *,
    masked_frames: np.ndarray | None = None,
    name: str = "clip0",
) -> Path:
    """One finalized stage-1 clip: (T, S, S, 3) uint8 `frames`, (T, S, S) uint8 `mask`;
    the masked frames default to the frames (a frames-VQGAN run never reads them)."""
    t, size = len(frames), frames.shape[1]
    writer = records.DatasetWriter(
        out_dir, "stage1", image_size=size, audio_window=11, audio_dim=33, image_encoding="png"
    )
    writer.write_video(
        "train",
        name,
        {
            "frame": frames,
            "masked_frame": frames if masked_frames is None else masked_frames,
            "mask": mask,
            "landmarks": np.zeros((t, 68, 2), np.float32),
            "crop_box": np.zeros((t, 4), np.float32),
            "source_size": np.full((t, 2), size, np.int32),
            "audio": np.zeros((t, 11, 33), np.float32),
        },
        identity="id0",
    )
    return Path(writer.finalize())


def write_random_stage2(
    out_dir: str | Path,
    *,
    videos: int = 2,
    frames: int = 24,
    latent_shape: tuple[int, int, int] = (16, 16, 3),
    num_masked: int = 2,
    audio_window: int = 11,
    audio_dim: int = 33,
    seed: int = 0,
) -> Path:
    """Writes and finalizes `videos` videos of `frames` random frames; returns `out_dir`.

    The masked latent is the target latent with its lower half zeroed, so it is a plausible
    function of the target; the audio is random.
    """
    writer = records.DatasetWriter(
        out_dir,
        "stage2",
        latent_shape=latent_shape,
        num_masked=num_masked,
        audio_window=audio_window,
        audio_dim=audio_dim,
    )
    rng = np.random.default_rng(seed)
    h = latent_shape[0]
    for v in range(videos):
        latent = rng.normal(size=(frames, *latent_shape)).astype(np.float32)
        masked = np.repeat(latent[:, None], num_masked, axis=1)
        masked[:, :, h // 2 :] = 0.0
        writer.write_video(
            "train",
            f"video{v:03d}",
            {
                "latent": latent.astype(np.float16),
                "masked_latents": masked.astype(np.float16),
                # The lower half, where `masked` hides the target: the mask-weighted loss's
                # region.
                "mask": np.broadcast_to(
                    (np.arange(h) >= h // 2)[:, None] * np.uint8(255), (frames, h, latent_shape[1])
                ),
                "audio": rng.normal(size=(frames, audio_window, audio_dim)).astype(np.float32),
            },
            identity=f"id{v % 2}",
        )
    writer.finalize()
    return Path(out_dir)


if __name__ == "__main__":
    # Random records for a CPU demo of train.py (configs/dit.py:testing wants 16x16x3):
    #   python tests/stage2_data.py /tmp/latents
    print(write_random_stage2(sys.argv[1], videos=4, frames=32))


def random_ifnet(seed: int = 0):
    """models/ifnet.py's TESTING IFNet with weights drawn in numpy (jax.random compiles one
    sampler per weight shape, seconds each on this CPU): for plumbing, not quality."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dithead_jax.models import ifnet

    abstract = nnx.eval_shape(lambda: ifnet.IFNet(ifnet.TESTING, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.3, 0.3, s.shape), s.dtype), shapes)
    return nnx.merge(graphdef, params)
