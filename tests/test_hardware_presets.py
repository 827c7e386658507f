"""Hardware presets (configs/hardware.py) and multi-slice (ICI x DCN) meshes.

CPU devices carry no `slice_index`, so a hybrid mesh over one CPU process cannot be built:
its slices are processes there (as on GPU hosts). The 2-process test builds the hybrid mesh
the `cpu-2x4` preset names through jax.distributed on localhost and checks the layout
`make_array_from_process_local_data` relies on: each process's devices one contiguous
block of the batch.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from configs import hardware
from dithead_jax import sharding
from dithead_jax.config import MeshConfig

ROOT = Path(__file__).resolve().parents[1]


def test_mesh_specs_with_dcn_axes_parse_and_resolve():
    assert sharding.mesh_config("fsdp,dcn_data=2") == MeshConfig(
        data=1, fsdp=-1, tensor=1, dcn_data=2
    )
    assert sharding.mesh_config("data=2,fsdp=4,dcn_fsdp=2") == MeshConfig(
        data=2, fsdp=4, tensor=1, dcn_fsdp=2
    )
    assert sharding.mesh_config("dp") == MeshConfig()  # presets unchanged, 1 slice
    # 64 devices in 2 slices: fsdp=-1 is the 32 devices of one slice; data spans slices.
    config = sharding.mesh_config("fsdp,dcn_data=2")
    assert sharding.ici_dcn_shapes(config, 64) == ((1, 32, 1), (2, 1, 1))
    assert sharding.mesh_shape(config, 64) == (2, 32, 1)
    assert sharding.mesh_shape(sharding.mesh_config("fsdp_tp,dcn_data=4"), 32) == (4, 4, 2)
    for spec, devices, message in [
        ("fsdp,dcn_data=3", 64, "cannot form 3 equal slices"),
        ("data=4,fsdp=4,dcn_data=2", 64, "needs 16 devices, 32 per slice"),
        ("fsdp,dcn_tensor=2", 8, "unknown mesh axis 'dcn_tensor'"),
        ("fsdp,dcn_data=x", 8, "not an int"),
        ("fsdp,dcn_data=0", 8, "must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            sharding.mesh_shape(sharding.mesh_config(spec), devices)


def test_single_process_cpu_cannot_fake_slices_and_says_so():
    with pytest.raises(ValueError, match=r"spans 2 slices over DCN; these 8 devices form 1"):
        sharding.make_mesh("fsdp,dcn_data=2")
    mesh = sharding.make_mesh("fsdp,dcn_data=1")  # one slice: the ordinary mesh
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("name", sorted(hardware.PRESETS))
def test_hardware_presets_resolve_on_their_device_count(name):
    config = hardware.get_config(name)
    mesh = sharding.mesh_config(config.mesh)
    data, fsdp, tensor = sharding.mesh_shape(mesh, config.devices)
    assert data * fsdp * tensor == config.devices
    # A slice is a host (one process per host): the DCN axes count hosts/slices exactly.
    assert config.processes % mesh.num_slices == 0
    assert config.global_batch_size % (data * fsdp) == 0  # sharding.training_mesh's rule
    flags = hardware.train_flags(name)
    assert f"--config.mesh={config.mesh}" in flags
    if config.hbm_gib:
        assert hardware.projection(name, 0.4)["step_s"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs in each of 2 processes x 4 CPU devices.
WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from configs import hardware
    from dithead_jax import sharding
    preset = hardware.get_config("cpu-2x4")
    mesh = sharding.make_mesh(preset.mesh)
    batch = sharding.batch_sharding(sharding.DIT_RULES, mesh)
    n = preset.global_batch_size
    rows = sorted({i for d, idx in batch.devices_indices_map((n,)).items()
                   if d.process_index == jax.process_index()
                   for i in range(n)[idx[0]]})
    local = np.arange(rows[0], rows[-1] + 1, dtype=np.float32)
    x = jax.make_array_from_process_local_data(batch, local, (n,))
    total = jax.jit(lambda a: (a * a).sum(), out_shardings=sharding.replicated(mesh))(x)
    print(json.dumps({
        "shape": dict(mesh.shape),
        "processes": [[d.process_index for d in row.ravel()] for row in mesh.devices],
        "rows": rows,
        "total": float(total),
    }))
""")


def test_hybrid_mesh_two_processes_data_across_fsdp_within():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, address, str(i)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for _, e in outs)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for r in results:
        assert r["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
        # Data runs across the two slices (processes), fsdp within one.
        assert r["processes"] == [[0, 0, 0, 0], [1, 1, 1, 1]]
        assert r["total"] == float(sum(i * i for i in range(8)))
    assert results[0]["rows"] == [0, 1, 2, 3] and results[1]["rows"] == [4, 5, 6, 7]
    assert jax.device_count() == 8  # this process's own 8 devices were left alone
