"""The one module that knows the device mesh.

Mesh axes are `("data", "fsdp", "tensor")` (`MeshConfig`; one size may be -1 = the rest):

    data    pure data parallelism: parameters replicated, batch split
    fsdp    data parallelism with parameters (and optimizer state) split as well (ZeRO-3);
            XLA all-gathers each weight where it is used and reduce-scatters its gradient
    tensor  Megatron-style tensor parallelism: heads and MLP width split

Model code names *logical* axes only (`batch`, `embed`, `mlp`, `heads`, ...; the DiT's
vocabulary is at the top of `models/dit.py`). A rule set maps each logical name to mesh
axes; `DIT_RULES` and `VQGAN_RULES` are kept apart because a conv net and a transformer
want different layouts (maxdiffusion keeps its VAE rules apart for the same reason).

Axis types: the mesh is built with `AxisType.Auto` on every axis (`jax.make_mesh` would
default to Explicit in this jax). With Auto, shardings live only on jit boundaries
(`in_shardings` / `out_shardings` from the rules below) and XLA's partitioner propagates
them through the step, so model code needs no sharding-aware types; this is how maxtext
drives its NNX models. Explicit axes would make every op's sharding part of its type and
force the model code to resolve ambiguous cases (reshapes of sharded dims) by hand.

Turning logical names into a `PartitionSpec` (`logical_to_spec`):
  * unknown names and None map to None (replicated dimension);
  * mesh axes of size 1 are dropped, so the dp preset gives fully replicated specs;
  * a mesh axis already used by an earlier dimension of the same array is dropped (an
    array cannot be split twice over one axis);
  * axes that do not divide the dimension are dropped, last axis first (e.g. DiT-S's six
    heads on a 4-way tensor axis stay whole), so every preset works for every model size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dithead_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Transformer rules (maxtext-style FSDP + tensor parallelism). The batch is split over
# both data axes; every weight is split over `fsdp` along its model-width dimension and over
# `tensor` along heads / MLP width, so fsdp_tp is FSDP across groups and Megatron inside.
DIT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("patch", None),
    ("audio", None),
    ("norm", None),
    ("layers", None),
)

# VQGAN / discriminator / LPIPS rules. Convolutions have no heads to split and their
# activations dwarf their weights, so the `tensor` axis joins the batch axes (a VQGAN run
# on a fsdp_tp mesh is still fully data parallel) and weights are split over `fsdp` along
# their output channels only. Kernel taps, codebook entries and norms stay whole: the
# codebook is 16384 x 3 and every device needs all of it for the nearest-code search.
VQGAN_RULES: Rules = (
    ("batch", ("data", "fsdp", "tensor")),
    ("height", None),
    ("width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", "fsdp"),  # attention / linear widths in the middle block
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("codebook", None),
    ("codebook_dim", None),
    ("norm", None),
)


# ---------------------------------------------------------------------------------------
# Mesh


def mesh_config(value: str | Mapping[str, int] | MeshConfig) -> MeshConfig:
    """A `MeshConfig` from a preset name ("dp", "fsdp", "fsdp_tp"), an axis spec string
    ("data=2,fsdp=-1,tensor=2"; missing axes are 1), a mapping, or a MeshConfig."""
    if isinstance(value, MeshConfig):
        return value
    if isinstance(value, str):
        if "=" not in value:
            return MeshConfig.preset(value.strip())
        sizes: dict[str, int] = {"data": 1, "fsdp": 1, "tensor": 1}
        for part in value.split(","):
            name, _, size = part.partition("=")
            if name.strip() not in sizes:
                raise ValueError(f"unknown mesh axis {name.strip()!r} in {value!r}")
            sizes[name.strip()] = int(size)
        return MeshConfig(**sizes)
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return MeshConfig(**dict(value))


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with the -1 axis resolved against `num_devices`."""
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {config}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {config}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split as {config}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        shape = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(f"mesh {shape} needs {math.prod(sizes)} devices, there are {num_devices}")
    return sizes[0], sizes[1], sizes[2]


def make_mesh(config: MeshConfig | str, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh ('data', 'fsdp', 'tensor') over `devices` (default: all), Auto axis types.

    `jax.make_mesh` orders devices for the physical topology (ICI rings on TPU) and keeps
    each process's devices contiguous, which `make_array_from_process_local_data` needs.
    """
    config = mesh_config(config)
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def distributed_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a multi-process job.

    `DITHEAD_DISTRIBUTED=1|0` forces the answer. Otherwise: an explicit
    `JAX_COORDINATOR_ADDRESS`, or a launcher that started more than one process (SLURM,
    Open MPI), or a multi-host Cloud TPU slice. A single-host TPU VM or GPU box needs nothing.
    """
    env = os.environ if env is None else env
    forced = env.get("DITHEAD_DISTRIBUTED")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` (cluster auto-detection) when the environment
    asks for it; must run before anything touches a device. Returns whether it did."""
    if not distributed_requested():
        return False
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


# ---------------------------------------------------------------------------------------
# Logical names -> PartitionSpecs / NamedShardings


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    names: Sequence[str | None] | P,
    rules: Rules,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
) -> P:
    """Logical axis names (one per dimension) -> a mesh `PartitionSpec` (see module doc)."""
    table = dict(rules)
    used: set[str] = set()
    entries: list[MeshAxes] = []
    for dim, name in enumerate(tuple(names)):
        axes = [a for a in _as_tuple(table.get(name)) if mesh.shape[a] > 1 and a not in used]
        if shape is not None:
            # Drop from the end until the remaining axes divide the dimension.
            while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*entries)


def _names_of(leaf: Any) -> tuple[str | None, ...] | None:
    """Logical names recorded on an nnx Variable (None if it has none)."""
    if not isinstance(leaf, nnx.Variable):
        return None
    # flax 0.12 stores `with_partitioning` names as "out_sharding" (older: "sharding_names").
    metadata = leaf.get_metadata()
    names = metadata.get("out_sharding", metadata.get("sharding_names"))
    return tuple(names) if names else None


def tree_specs(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """Mesh `PartitionSpec`s, one per array leaf, for an (abstract) nnx State or any pytree
    whose leaves may be nnx Variables carrying `sharding_names`. Plain leaves replicate."""

    def spec(leaf: Any) -> Any:
        names = _names_of(leaf)
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        shape = getattr(value, "shape", ())
        if names is None:
            names = (None,) * len(shape)
        if len(names) != len(shape):
            raise ValueError(f"logical names {names} do not match shape {shape}")
        s = logical_to_spec(names, rules, mesh, shape)
        return leaf.replace(s) if isinstance(leaf, nnx.Variable) else s

    return jax.tree.map(spec, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """`NamedSharding`s (same structure as `tree`) from the rules; see `tree_specs`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, rules, mesh),
                        is_leaf=lambda x: isinstance(x, P))  # fmt: skip


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(rules: Rules, mesh: Mesh) -> P:
    """Leading (batch) dimension split over the rules' batch axes, the rest whole."""
    return logical_to_spec(("batch",), rules, mesh)


def batch_sharding(rules: Rules, mesh: Mesh) -> NamedSharding:
    """One sharding for every array of a batch (a 1-entry spec leaves other dims whole)."""
    return NamedSharding(mesh, batch_spec(rules, mesh))


def batch_shards(rules: Rules, mesh: Mesh) -> int:
    """How many ways the batch is split: the global batch must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in _as_tuple(batch_spec(rules, mesh)[0]))


def describe(mesh: Mesh) -> str:
    """ "data=2 fsdp=4 tensor=1 (8 devices, 1 process)" for logs."""
    axes = " ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    return f"{axes} ({mesh.size} devices, {jax.process_count()} process(es))"


def training_mesh(
    config: MeshConfig, rules: Rules, global_batch_size: int, devices: Sequence[Any] | None = None
) -> tuple[Mesh, NamedSharding]:
    """A run's mesh and batch sharding; the global batch must split evenly over both the
    batch shards and the processes (each host feeds an equal slice)."""
    mesh = make_mesh(config, devices)
    shards = batch_shards(rules, mesh)
    if global_batch_size % (shards * jax.process_count()):
        raise ValueError(f"global batch {global_batch_size} is not a multiple of the "
                         f"{shards} batch shards x {jax.process_count()} processes")  # fmt: skip
    logging.info("Mesh: %s", describe(mesh))
    return mesh, batch_sharding(rules, mesh)
