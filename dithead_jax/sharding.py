"""The one module that knows the device mesh.

Mesh axes are `("data", "fsdp", "tensor")` (`MeshConfig`; one size may be -1 = the rest):

    data    pure data parallelism: parameters replicated, batch split
    fsdp    data parallelism with parameters (and optimizer state) split as well (ZeRO-3);
            XLA all-gathers each weight where it is used and reduce-scatters its gradient
    tensor  Megatron-style tensor parallelism: heads and MLP width split

Model code names *logical* axes only (`embed`, `mlp`, `heads`, ...; the DiT's vocabulary is
at the top of `models/dit.py`). A rule set maps each logical name to mesh axes; `DIT_RULES`
and `VQGAN_RULES` are kept apart because a conv net and a transformer want different
layouts (maxdiffusion keeps its VAE rules apart for the same reason).

Parameters and activations have separate names (maxtext style): a weight's "embed" is split
over `fsdp` (ZeRO-3 storage), while the residual stream's "activation_embed" stays whole and
its "activation_batch" is split over every data-parallel axis. `constrain(x, names)` pins an
activation to its rule inside the step. Without these pins XLA's propagation can spread the
weights' `embed -> fsdp` layout onto the activations: the scanned DiT under `fsdp` then ran
every example of the global batch on every device (attention buffers (B_global, heads, L, L),
8x the temp memory, all-to-alls inside the layer loop). tests/test_compiled_sharding.py
checks the compiled programs.

Which rule set a model's activations use is chosen by the caller, not the model: the
trainer traces the step inside `nnx.logical_axis_rules(rules)` (flax's context; the same
rules that shard the parameters) on `jax.set_mesh(mesh)`. Outside that context, or without a
mesh (single-device tests, sampling, `eval_shape`), `constrain` is the identity. jax's
trace cache is keyed on the mesh but not on flax's rules: a jitted function must always be
called inside the same rules context (the trainers wrap every call).

Axis types: the mesh is built with `AxisType.Auto` on every axis (`jax.make_mesh` would
default to Explicit in this jax). With Auto, shardings live on jit boundaries
(`in_shardings` / `out_shardings` from the rules below) and at the activation pins, and
XLA's partitioner propagates them in between, so model code needs no sharding-aware
types; this is how maxtext
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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dithead_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Transformer rules (maxtext-style FSDP + tensor parallelism). The batch is split over
# both data axes; every weight is split over `fsdp` along its model-width dimension and over
# `tensor` along heads / MLP width, so fsdp_tp is FSDP across groups and Megatron inside:
# activations keep the model width whole and split heads / MLP hidden over `tensor`.
DIT_RULES: Rules = (
    # Activations (the argument names of `constrain`).
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    # Parameters.
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
    # Activations: feature maps (B, H, W, C) split by example only.
    ("activation_batch", ("data", "fsdp", "tensor")),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_channels", None),
    # Parameters.
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


DCN_AXES = ("dcn_data", "dcn_fsdp")


def mesh_config(value: str | Mapping[str, int] | MeshConfig) -> MeshConfig:
    """A `MeshConfig` from a preset name ("dp", "fsdp", "fsdp_tp"), an axis spec string
    ("data=2,fsdp=-1,tensor=2"; missing axes are 1), a preset with overrides
    ("fsdp,dcn_data=2": FSDP in each slice, data parallel across 2), a mapping, or a
    MeshConfig."""
    if isinstance(value, MeshConfig):
        return value
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            raise ValueError("empty mesh spec")
        base = MeshConfig(data=1) if "=" in parts[0] else MeshConfig.preset(parts.pop(0))
        sizes = {f: getattr(base, f) for f in (*MESH_AXES, *DCN_AXES)}
        for part in parts:
            name, eq, size = (x.strip() for x in part.partition("="))
            if not eq or name not in sizes:
                raise ValueError(f"unknown mesh axis {name!r} in {value!r} (axes: {list(sizes)})")
            try:
                sizes[name] = int(size)
            except ValueError:
                raise ValueError(f"mesh axis {name}={size!r} in {value!r}: not an int") from None
        return MeshConfig(**sizes)
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return MeshConfig(**dict(value))


def ici_dcn_shapes(
    config: MeshConfig, num_devices: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((data, fsdp, tensor) within a slice, (data, fsdp, tensor) across slices); the -1
    axis resolves against one slice's devices (`num_devices / num_slices`)."""
    dcn = (config.dcn_data, config.dcn_fsdp, 1)
    if any(d < 1 for d in dcn):
        raise ValueError(f"dcn axis sizes must be >= 1, got {config}")
    slices = math.prod(dcn)
    if num_devices % slices:
        raise ValueError(f"{num_devices} devices cannot form {slices} equal slices ({config})")
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {config}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {config}")
    per_slice = num_devices // slices
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            each = " per slice" if slices > 1 else ""
            raise ValueError(f"{per_slice} devices{each} cannot be split as {config}")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        shape = dict(zip(MESH_AXES, sizes, strict=True))
        where = f"{per_slice} per slice" if slices > 1 else f"there are {per_slice}"
        raise ValueError(f"mesh {shape} needs {math.prod(sizes)} devices, {where}")
    return (sizes[0], sizes[1], sizes[2]), dcn


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of the whole mesh (within-slice x across-slice), with the
    -1 axis resolved against `num_devices`."""
    ici, dcn = ici_dcn_shapes(config, num_devices)
    return ici[0] * dcn[0], ici[1] * dcn[1], ici[2] * dcn[2]


def slice_granules(devices: Sequence[Any]) -> tuple[str, int]:
    """What a "slice" is on these devices, and how many there are: TPU slices (devices
    carry `slice_index`) when there are several, else processes (GPU hosts, CPU tests)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        return "slice", len(slices)
    return "process", len({d.process_index for d in devices})


def make_mesh(config: MeshConfig | str, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh ('data', 'fsdp', 'tensor') over `devices` (default: all), Auto axis types.

    `jax.make_mesh` orders devices for the physical topology (ICI rings on TPU) and keeps
    each process's devices contiguous, which `make_array_from_process_local_data` needs.
    With DCN axes (`dcn_data`/`dcn_fsdp` > 1) the mesh is hybrid: one ICI-ordered block per
    slice (TPU slice, else process), the blocks laid out along the DCN axes, so each mesh
    axis runs slice-major and a slice's devices stay contiguous along it.
    """
    config = mesh_config(config)
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = ici_dcn_shapes(config, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn) == 1:
        return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
    kind, found = slice_granules(devices)
    if found != math.prod(dcn):
        raise ValueError(f"mesh {config} spans {math.prod(dcn)} slices over DCN; these "
                         f"{len(devices)} devices form {found} ({kind}s)")  # fmt: skip
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=kind == "process"
    )
    return Mesh(array, MESH_AXES, axis_types=axis_types)


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


def current_spec(names: Sequence[str | None], shape: Sequence[int]) -> P | None:
    """`names` resolved against the current mesh and flax's current rules; None when
    either is missing (see `constrain`)."""
    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    return logical_to_spec(names, rules, mesh, shape)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` (one logical name per dimension) to its rule's layout.

    The rules are flax's current `nnx.logical_axis_rules` and the mesh is the current one
    (`jax.set_mesh`); without either this is the identity, so model code can call it
    unconditionally. Axes that do not divide a dimension are dropped (`logical_to_spec`).
    """
    spec = current_spec(names, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def batch_shards_in_context() -> int:
    """How many ways `constrain` splits an activation's batch under the current mesh and
    rules (1 outside them): what a batch must be a multiple of to split evenly."""
    spec = current_spec(("activation_batch",), (0,))  # 0 rows: every axis divides
    if spec is None or spec[0] is None:
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in _as_tuple(spec[0]))


def tree_shardings(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """`NamedSharding`s (same structure as `tree`) from the rules; see `tree_specs`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, rules, mesh),
                        is_leaf=lambda x: isinstance(x, P))  # fmt: skip


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(rules: Rules, mesh: Mesh) -> P:
    """Leading (batch) dimension split over the rules' batch axes, the rest whole."""
    return logical_to_spec(("activation_batch",), rules, mesh)


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
    """A run's mesh and batch sharding; the global batch must split evenly over the batch
    shards (each process then feeds the rows its devices hold: `loop.host_rows`)."""
    mesh = make_mesh(config, devices)
    shards = batch_shards(rules, mesh)
    if global_batch_size % shards:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of the "
                         f"{shards} batch shards")  # fmt: skip
    logging.info("Mesh: %s", describe(mesh))
    return mesh, batch_sharding(rules, mesh)
