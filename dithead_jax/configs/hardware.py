"""Hardware presets for DiT-L/2 training: mesh, batch and layout per cluster shape.

    python configs/hardware.py a100-4x8          # the train.py overrides, one per line
    python configs/hardware.py --list            # every preset with its projection (JSON)

`get_config(name)` gives the preset as a ConfigDict; `train_flags(name)` the
`--config.*` overrides that apply it to `configs/dit.py:L_2`:

    python train.py --config configs/dit.py:L_2 --workdir W --config.data.dir=LATENTS \\
        $(python configs/hardware.py a100-4x8)

Every preset keeps 8 examples per device (global batch = 8 x devices, batch split over
data x fsdp), bf16 compute with float32 master weights, scan over layers and a remat
policy, so the per-device memory is the one `bench/dit.py` compiles for L/2 at 8 per
device (bench/results/dit_memory.json). Meshes: FSDP inside a host or slice, where the
interconnect (NVLink, TPU ICI) carries its per-layer all-gathers; plain data parallelism
across hosts or slices over the slower network (`dcn_data`: one gradient reduction per
step crosses it). "One process per host" throughout: a host's devices form one slice.

`projection(name, mfu)`: step time and examples/s from the analytic model FLOPs
(`dit_step.dit_train_flops`) at an assumed MFU (a planning figure: measure the real one
with bench/accelerator.py on the machine).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import ml_collections

# Run as a script from a checkout (configs/hardware.py): the repository root, above the
# package, so `dithead_jax` imports without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dithead_jax.config import DiTConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Hardware:
    accelerator: str
    hosts: int
    devices_per_host: int  # JAX devices: GPUs, or TPU chips (v5p: one device per chip)
    hbm_gib: float  # per device
    peak_bf16_tflops: float  # dense, per device
    mesh: str  # sharding.mesh_config syntax
    remat_policy: str
    launcher: str
    per_device_batch: int = 8

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch * self.devices


# Remat: "dots_with_no_batch_dims_saveable" keeps the weight matmuls' outputs and recomputes
# the rest (attention, norms, activations); on L/2 at 8 per device it compiles to 12.8 GiB
# per device under fsdp=8 and 23.8 GiB under dp (bench/results/dit_memory.json), within
# every device below. "full" (recompute everything) would halve that again for ~1/3 more
# FLOPs; no preset needs it.
PRESETS: dict[str, Hardware] = {
    # One host, 8 x H100 80 GB on NVLink: FSDP over all eight.
    "h100-8": Hardware("NVIDIA H100 80GB", 1, 8, 80.0, 989.0, "fsdp",
                       "dots_with_no_batch_dims_saveable", "single host"),
    # 2 hosts x 8 H100 over InfiniBand: FSDP within a host, data parallel across.
    "h100-2x8": Hardware("NVIDIA H100 80GB", 2, 8, 80.0, 989.0, "fsdp,dcn_data=2",
                         "dots_with_no_batch_dims_saveable", "SLURM, one process per node"),
    # 4 hosts x 8 A100 40 GB: the paper-like global batch 256.
    "a100-4x8": Hardware("NVIDIA A100 40GB", 4, 8, 40.0, 312.0, "fsdp,dcn_data=4",
                         "dots_with_no_batch_dims_saveable", "SLURM, one process per node"),
    # One TPU v5p-64 slice: 32 chips on 8 hosts (v5p-N counts TensorCores, 2 per chip),
    # one ICI torus: FSDP over all 32 chips.
    "v5p-64": Hardware("TPU v5p", 8, 4, 95.0, 459.0, "fsdp",
                       "dots_with_no_batch_dims_saveable", "TPU VM, --worker=all"),
    # Two v5p-64 slices joined over DCN (multislice): FSDP in a slice, data across slices.
    "v5p-64x2": Hardware("TPU v5p", 16, 4, 95.0, 459.0, "fsdp,dcn_data=2",
                         "dots_with_no_batch_dims_saveable", "TPU multislice (queued resource)"),
    # The localhost layout the test suite runs: 2 processes x 4 simulated CPU devices.
    "cpu-2x4": Hardware("cpu", 2, 4, 0.0, 0.0, "fsdp,dcn_data=2", "none",
                        "2 local processes", per_device_batch=1),
}  # fmt: skip


def get_config(name: str = "h100-8") -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown hardware preset {name!r}; choose from {sorted(PRESETS)}")
    hw = PRESETS[name]
    config = ml_collections.ConfigDict(dataclasses.asdict(hw))
    config.name = name
    config.devices = hw.devices
    config.processes = hw.hosts  # one process per host
    config.global_batch_size = hw.global_batch_size
    return config


def train_flags(name: str) -> list[str]:
    """`--config.*` overrides for train.py with configs/dit.py:L_2 on this hardware."""
    hw = PRESETS[name]
    flags = [
        f"--config.mesh={hw.mesh}",
        f"--config.train.global_batch_size={hw.global_batch_size}",
        "--config.model.dtype=bfloat16",
        "--config.model.scan_layers=True",
        f"--config.model.remat_policy={hw.remat_policy}",
    ]
    # attention_impl stays configs/dit.py's "auto": cuDNN flash on GPU, splash on TPU.
    return flags


def projection(name: str, mfu: float, model: DiTConfig | None = None) -> dict[str, float]:
    """Planned step time and throughput at `mfu` (model FLOPs / peak; remat's recompute
    is not model FLOPs, so it lowers the MFU a run reaches rather than raising the count)."""
    from dithead_jax.training.dit_step import dit_train_flops

    hw = PRESETS[name]
    model = model or DiTConfig.named("L_2")
    per_device = dit_train_flops(model, hw.per_device_batch)
    step_s = per_device / (mfu * hw.peak_bf16_tflops * 1e12)
    return {
        "mfu_assumed": mfu,
        "model_tflops_per_device_step": round(per_device / 1e12, 2),
        "step_s": round(step_s, 4),
        "examples_per_s": round(hw.global_batch_size / step_s, 1),
        "examples_per_s_per_device": round(hw.per_device_batch / step_s, 1),
    }


# Planning MFUs (model FLOPs over dense bf16 peak), not measurements.
ASSUMED_MFU = {"NVIDIA H100 80GB": 0.40, "NVIDIA A100 40GB": 0.45, "TPU v5p": 0.45}


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        for name, hw in PRESETS.items():
            row = {"name": name, **dataclasses.asdict(hw), "devices": hw.devices,
                   "global_batch_size": hw.global_batch_size}  # fmt: skip
            if hw.accelerator in ASSUMED_MFU:
                row["projection"] = projection(name, ASSUMED_MFU[hw.accelerator])
            print(json.dumps(row))
        return 0
    if len(argv) != 1 or argv[0] not in PRESETS:
        print(f"usage: configs/hardware.py {{{','.join(PRESETS)}}} | --list", file=sys.stderr)
        return 2
    print("\n".join(train_flags(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
