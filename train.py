"""Trains either stage of DiT-Head: the VQGANs (stage 1) or the DiT denoiser (stage 2).

    python train.py --config configs/vqgan.py:f4_16384 --workdir W1 --config.data.dir=STAGE1 \
        [--config.target=frames|masked]
    python train.py --config configs/dit.py:testing --workdir /tmp/dit \
        --config.data.dir=LATENTS [--config.mesh=dp|fsdp|fsdp_tp] [--config.<field>=<value>]

The config's `stage` picks the trainer (configs/vqgan.py sets "vqgan"; DiT configs "dit").
DiT variants: testing (tiny; a short CPU run), S_2, B_2, L_2, XL_2. Re-running with the same
--workdir resumes from its newest checkpoint. TensorBoard event files go to --workdir.
Multi-host jobs (TPU pods, SLURM, MPI, or JAX_COORDINATOR_ADDRESS set) initialise
jax.distributed automatically; run the same command on every host.
"""

from __future__ import annotations

import logging as py_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/dit.py:L_2")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard files go here.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
    """Orbax logs every save in detail at INFO; keep its warnings, drop the rest."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())

    import jax

    from dithead_jax import sharding

    # Before anything touches a device: multi-host jobs must agree on the device set.
    sharding.maybe_initialize_distributed()

    from dithead_jax.cli import check_writable_dir, fail
    from dithead_jax.training import dit_train, loop, vqgan_train

    trainers = {
        "vqgan": (vqgan_train.VQGANRun, vqgan_train.build_task),
        "dit": (dit_train.DiTRun, dit_train.build_task),
    }
    stage = _CONFIG.value.get("stage", "dit")
    if stage not in trainers:
        fail("train.py", f"config.stage must be one of {sorted(trainers)}, got {stage!r}")
    run_type, build_task = trainers[stage]

    workdir = _WORKDIR.value
    if "://" not in workdir:  # gs:// and friends go straight to Orbax / tensorboardX
        workdir = str(check_writable_dir("train.py", workdir))
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            # A resumed run (after preemption, say) then skips recompiling its step.
            jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    try:  # bad config or data: one line, no traceback
        run = run_type.from_config(_CONFIG.value)
        task = build_task(_CONFIG.value)
    except (ValueError, FileNotFoundError) as e:
        fail("train.py", str(e))
    try:
        result = loop.run(task, run.train, workdir)
    except loop.NonFiniteLossError as e:
        fail("train.py", str(e), code=1)
    what = "preempted at" if result.preempted else "finished at"
    logging.info("Training %s step %d (resumed from step %d).",
                 what, result.final_step, result.start_step)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
