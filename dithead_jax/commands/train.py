"""Trains either stage of DiT-Head: the VQGANs (stage 1) or the DiT denoiser (stage 2).

    python train.py --config configs/vqgan.py:f4_16384 --workdir W1 --config.data.dir=STAGE1 \
        [--config.target=frames|masked]
    python train.py --config configs/dit.py:testing --workdir /tmp/dit \
        --config.data.dir=LATENTS [--config.mesh=dp|fsdp|fsdp_tp] [--config.<field>=<value>]

    python train.py --config configs/sync_expert.py:demo --workdir W3 --config.data.dir=STAGE1
    python train.py --config configs/vfi.py:demo --workdir W4 --config.data.dir=STAGE1

The config's `stage` picks the trainer (configs/vqgan.py sets "vqgan"; DiT configs "dit";
configs/sync_expert.py "sync_expert", the lip-sync expert for LSE and the sync loss;
configs/vfi.py "vfi", RIFE's IFNet frame interpolator trained on the stage-1 frames).
DiT variants: testing (tiny; a short CPU run), S_2, B_2, L_2, XL_2. Re-running with the same
--workdir resumes from its newest checkpoint. TensorBoard event files go to --workdir.
Multi-host jobs (TPU pods, SLURM, MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS set)
initialise jax.distributed automatically; run the same command on every host. A bare launch
names the coordinator itself, on each process I of N:

    python train.py ... --coordinator_address HOST:PORT --num_processes N --process_id I

--workdir may be a local path or a URL Orbax and tensorboardX write to (gs://bucket/run).
Exit status (constants in training/loop.py and cli.py):
    0   finished (or nothing to do: num_steps already reached)
    2   bad flags, config or data; the workdir is in use by another train.py; or its
        checkpoints were saved by a different model (or none of them restores)
    3   stopped on a non-finite loss, gradient or parameter; that state was not saved
    75  preempted (SIGTERM) with its checkpoint saved: requeue it (EX_TEMPFAIL)
    1   anything else (an unexpected crash)
One train.py per workdir: process 0 holds `<workdir>/train.lock` (training/workdir.py).
Installed with pip, the same program is `dithead-train`.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from dithead_jax.cli import DISTRIBUTED_HELP
from dithead_jax.configs import with_shipped_configs

PROG = "train.py"
_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/dit.py:L_2")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard files go here.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, DISTRIBUTED_HELP["coordinator_address"]
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, DISTRIBUTED_HELP["num_processes"])
_PROCESS_ID = flags.DEFINE_integer("process_id", None, DISTRIBUTED_HELP["process_id"])
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
    """Orbax logs every save in detail at INFO; keep its warnings, drop the rest."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str] | None = None) -> int:
    """Runs training with `argv` (without the program name; None: sys.argv's) and returns
    the exit status listed in the module docstring."""
    args = [PROG, *with_shipped_configs(sys.argv[1:] if argv is None else argv)]
    try:
        app.run(_main, argv=args, flags_parser=_parse_flags)
    except SystemExit as e:  # app.run and `fail` end in sys.exit; hand back its status
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    return 0


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())

    import jax

    from dithead_jax.cli import fail, initialize_distributed, run_dir

    # Before anything touches a device: multi-host jobs must agree on the device set.
    initialize_distributed(PROG, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    from dithead_jax.training import dit_train, sync_expert_train, vfi_train, vqgan_train
    from dithead_jax.training import workdir as workdir_lib

    trainers = {
        "vqgan": (vqgan_train.VQGANRun, vqgan_train.build_task),
        "dit": (dit_train.DiTRun, dit_train.build_task),
        "sync_expert": (sync_expert_train.SyncExpertRun, sync_expert_train.build_task),
        "vfi": (vfi_train.VFIRun, vfi_train.build_task),
    }
    stage = _CONFIG.value.get("stage", "dit")
    if stage not in trainers:
        fail(PROG, f"config.stage must be one of {sorted(trainers)}, got {stage!r}")
    run_type, build_task = trainers[stage]

    try:  # bad config: one line, no traceback
        run = run_type.from_config(_CONFIG.value)
    except (ValueError, FileNotFoundError) as e:
        fail(PROG, str(e))
    if run.train.num_steps <= 0 and not _has_checkpoints(_WORKDIR.value):
        logging.info("Nothing to do: num_steps is %d; %s left as it was.",
                     run.train.num_steps, _WORKDIR.value)  # fmt: skip
        return
    workdir = run_dir(PROG, _WORKDIR.value)  # gs://... stays a URL
    # Before anything is written there; only process 0: the others are the same run.
    try:
        with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
            _train(run, build_task, workdir)
    except workdir_lib.WorkdirBusyError as e:
        fail(PROG, str(e))


def _has_checkpoints(workdir: str) -> bool:
    from dithead_jax.training.checkpoint import as_path

    return (as_path(workdir) / "checkpoints").exists()


def _train(run: Any, build_task: Any, workdir: Any) -> None:
    """Builds the stage's task and runs the loop in the locked `workdir`."""
    import jax

    from dithead_jax.cli import fail
    from dithead_jax.training import loop
    from dithead_jax.training.checkpoint import UnrestorableError
    from dithead_jax.training.workdir import ResumeMismatchError

    if "://" not in str(workdir) and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # A resumed run (after preemption, say) then skips recompiling its step.
        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    try:  # bad data: one line, no traceback
        task = build_task(_CONFIG.value)
    except (ValueError, FileNotFoundError) as e:
        fail(PROG, str(e))
    if _CONFIG.value.get("stage", "dit") == "dit" and jax.process_index() == 0:
        _record_latents(workdir)
    try:
        result = loop.run(task, run.train, workdir)
    except (ResumeMismatchError, UnrestorableError) as e:
        fail(PROG, str(e))
    except loop.NonFiniteLossError as e:
        fail(PROG, str(e), code=loop.EXIT_NON_FINITE)
    what = "preempted at" if result.preempted else "finished at"
    logging.info("Training %s step %d (resumed from step %d).",
                 what, result.final_step, result.start_step)  # fmt: skip
    if result.preempted:
        logging.flush()
        sys.exit(loop.EXIT_PREEMPTED)


def _record_latents(workdir: Any) -> None:
    """Where the DiT's latents are, from its workdir (runs.py), so sampling finds them after
    the run and its datasets move together; config.data.dir keeps the path as given."""
    from dithead_jax import runs

    data_dir = _CONFIG.value.data.get("dir")
    if data_dir and "://" not in str(data_dir):
        runs.record_latents(workdir, data_dir)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a `--config.<field>` override naming no field is one line, exit 2."""
    from dithead_jax.cli import config_override_error, fail

    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as e:
        message = config_override_error(e, argv)
        if message is None:
            raise
        fail(PROG, message)


if __name__ == "__main__":
    sys.exit(main())
