"""Multi-process start-up: `jax.distributed` from explicit flags or the cluster's own signs.

Three ways a run becomes multi-process, checked in this order by `initialize`:

    explicit    --coordinator_address HOST:PORT --num_processes N --process_id I on every
                process (a bare launch: ssh, a shell loop, the tests); all three or none
    forced      DITHEAD_DISTRIBUTED=1 (or 0 to never initialise), then JAX's detection
    detected    JAX_COORDINATOR_ADDRESS, or one of JAX's cluster environments
                (`jax._src.clusters`: Cloud TPU VMs on GCE -- found through the metadata
                server -- and GKE, SLURM, Open MPI, Kubernetes) that says more than one
                process runs; `jax.distributed.initialize()` then reads everything itself

A single-host TPU VM or GPU box needs none of it. On the CPU platform, cross-process
collectives need an implementation: gloo is selected before initialising (the default
of some jax versions is none, which fails at the first cross-process computation).

Once initialised, JAX's preemption notifier owns SIGTERM: it tells every process, and
`multihost_utils.reached_preemption_sync_point` (orbax's `reached_preemption`) turns the
notice into one step at which all processes stop (see `training/loop.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from absl import logging


def _cluster_envs() -> list[type]:
    """JAX's auto-detectable cluster environments (opt-in ones, like mpi4py, left out)."""
    from jax._src import clusters  # the classes jax.distributed.initialize() consults

    return [env for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method]


def detected_cluster() -> type | None:
    """The first cluster environment JAX's own auto-detection would pick, or None."""
    for env in _cluster_envs():
        try:
            if env.is_env_present():
                return env
        except Exception as e:  # a half-configured environment must not stop a local run
            logging.warning("cluster detection %s failed: %s", env.__name__, e)
    return None


def distributed_requested(env: Mapping[str, str] | None = None, *, detect: bool = True) -> bool:
    """Whether the environment describes a multi-process job.

    `DITHEAD_DISTRIBUTED=1|0` forces the answer. Otherwise: an explicit
    `JAX_COORDINATOR_ADDRESS`, a launcher that started more than one process (SLURM, Open
    MPI), a multi-host Cloud TPU slice named in the environment, or (`detect`, only for
    the real environment) a JAX cluster environment reporting more than one process.
    """
    real = env is None
    env = os.environ if env is None else env
    forced = env.get("DITHEAD_DISTRIBUTED")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in env:
        return int(env.get("SLURM_NTASKS", "1")) > 1
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return True
    if not (real and detect):
        return False
    cluster = detected_cluster()
    if cluster is None:
        return False
    try:
        count = cluster.get_process_count()
    except Exception as e:
        logging.warning("%s: cannot read the process count (%s); not initialising", cluster, e)
        return False
    return count > 1


def check_flags(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    """True when the explicit flags ask for a bare launch; ValueError when half given."""
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if not any(given):
        return False
    if not all(given):
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id go together "
            "(give all three on every process, or none for cluster auto-detection)"
        )
    assert num_processes is not None and process_id is not None and coordinator_address
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id {process_id} not in [0, --num_processes {num_processes})")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
    return True


def _select_cpu_collectives() -> None:
    # Only the CPU client reads this; GPU/TPU processes are unaffected.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts `jax.distributed` when flags or the environment ask for it (see the module
    doc); must run before anything touches a device. Returns whether it did."""
    if jax.distributed.is_initialized():
        return True
    explicit = check_flags(coordinator_address, num_processes, process_id)
    if not explicit and not distributed_requested():
        return False
    _select_cpu_collectives()
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def is_initialized() -> bool:
    """Whether this process is part of a `jax.distributed` job (preemption notices come from
    its service then, not from a Python signal handler)."""
    return jax.distributed.is_initialized()
