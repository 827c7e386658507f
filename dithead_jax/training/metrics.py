"""Metric writers (console + TensorBoard + JSON lines) without TensorFlow, MFU bookkeeping,
image grids.

clu's `metric_writers` package imports its TensorFlow `SummaryWriter` from `__init__`, so
`import clu.metric_writers` fails without TensorFlow (and its torch backend needs the
`tensorboard` package, also absent). We keep clu's `MetricWriter` interface and its
`LoggingWriter` / `MultiWriter` / `AsyncMultiWriter`, and make TensorBoard event files with
`TensorboardXWriter` below, a `MetricWriter` over tensorboardX (pure Python + protobuf).
To import the package at all, `_install_summary_writer_stub` registers a stand-in for
`clu.metric_writers.summary_writer` when TensorFlow is missing; its `SummaryWriter` only
raises, pointing here. Nothing else of clu is patched.

`JsonlWriter` appends every `write_scalars` call to `<workdir>/metrics.jsonl` as one line
{"step": s, "loss": ..., ...} with full float precision: a record scripts and tests read
without a TensorBoard reader (the console rounds to 6 digits). A resumed run appends; a
step written twice (re-run after SIGKILL) is read as its last line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath


def _install_summary_writer_stub() -> None:
    name = "clu.metric_writers.summary_writer"
    if name in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        return
    stub = types.ModuleType(name)

    class SummaryWriter:  # noqa: D401 - placeholder with clu's name
        def __init__(self, *args: Any, **kwargs: Any):
            raise ImportError(
                "clu's SummaryWriter needs TensorFlow; use "
                "dithead_jax.training.metrics.TensorboardXWriter / create_writer instead"
            )

    stub.SummaryWriter = SummaryWriter
    sys.modules[name] = stub


_install_summary_writer_stub()

from clu import metric_writers  # noqa: E402
from clu.metric_writers import interface  # noqa: E402

MetricWriter = interface.MetricWriter


class TensorboardXWriter(interface.MetricWriter):
    """clu `MetricWriter` that writes TensorBoard event files through tensorboardX."""

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes files

        # str() keeps gs:// as is (tensorboardX writes remote paths itself).
        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Any = None):
        for key, value in values.items():
            arr = np.asarray(value)
            if arr.size == 1:
                self._writer.add_scalar(key, float(arr), global_step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        """images: (N, H, W, C) or (H, W, C), float in [0, 1] or uint8."""
        for key, value in images.items():
            arr = np.asarray(value)
            if arr.ndim == 3:
                arr = arr[None]
            self._writer.add_images(key, arr, global_step=step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        for key, value in videos.items():  # (N, T, H, W, C) -> tensorboardX's NTCHW
            arr = np.asarray(value)
            self._writer.add_video(key, np.moveaxis(arr, -1, 2), global_step=step)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        for key, value in audios.items():
            arr = np.asarray(value)  # (N, T, C): first example, first channel
            clip = arr[0, :, 0] if arr.ndim == 3 else arr.reshape(-1)
            self._writer.add_audio(key, clip, global_step=step, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Any = None):
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        # As text: TensorBoard's hparams plugin wants a metric list we do not have up front.
        lines = [f"    {k} = {v}" for k, v in sorted(hparams.items())]
        self._writer.add_text("hparams", "\n".join(lines), global_step=0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class JsonlWriter(interface.MetricWriter):
    """Scalars only, one JSON line per `write_scalars` call appended to `path` (module doc)."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self._lines: list[str] = []

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step)} | {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._lines.append(json.dumps(row))
        self.flush()  # a line per log step: cheap, and nothing is lost to a SIGKILL

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Any = None):
        pass

    def write_images(self, step: int, images: Mapping[str, Any]):
        pass

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        pass

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]):
        pass

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Any = None):
        pass

    def write_hparams(self, hparams: Mapping[str, Any]):
        pass

    def flush(self):
        if not self._lines:
            return
        text = "".join(line + "\n" for line in self._lines)
        if "://" in os.fspath(self.path):
            # Object stores have no append: read, extend, rewrite.
            old = self.path.read_text() if self.path.exists() else ""
            self.path.write_text(old + text)
        else:
            with open(self.path, "a") as f:
                f.write(text)
        self._lines.clear()

    def close(self):
        self.flush()


def read_jsonl(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """step -> scalars of a `metrics.jsonl` (the last line of a step wins)."""
    rows = [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line]
    return {int(r.pop("step")): r for r in rows}


def create_writer(
    logdir: str | os.PathLike | None,
    *,
    just_logging: bool | None = None,
    asynchronous: bool = True,
) -> MetricWriter:
    """clu's `create_default_writer` with TensorBoard files from tensorboardX.

    Console (absl INFO) always; event files and `metrics.jsonl` in `logdir` (a local path
    or an epath URL such as gs://...) only when not `just_logging` (default: every process
    but 0, so one host writes the files).
    """
    if just_logging is None:
        just_logging = jax.process_index() > 0
    writers: list[MetricWriter] = [metric_writers.LoggingWriter()]
    if logdir and not just_logging:
        writers.append(TensorboardXWriter(logdir))
        writers.append(JsonlWriter(epath.Path(logdir) / "metrics.jsonl"))
    if asynchronous:
        return metric_writers.AsyncMultiWriter(writers)
    return metric_writers.MultiWriter(writers)


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 0}} -> {"train.seed": 0}; leaves as they are."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten_dict(value, name + ".")
        else:
            out[name] = value
    return out


def flatten_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run config as flat hparams: tuples/lists and None as strings (TensorBoard's)."""
    return {k: str(v) if isinstance(v, list | tuple) or v is None else v
            for k, v in flatten_dict(config).items()}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Throughput and model FLOP utilisation

# Dense bf16 peak TFLOP/s per device (per chip for TPU, per GPU) by `device_kind` prefix.
# MFU against the bf16 peak is the usual convention even for float32 runs.
_PEAK_TFLOPS = (
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H100", 989.0),
    ("NVIDIA A100", 312.0),
    ("NVIDIA L4", 121.0),
)


def measure_gemm_flops(n: int = 1024, repeats: int = 5, dtype: Any = jnp.float32) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul on the default device."""
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def cpu_model() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo; else `platform.processor()`), for
    bench records: the GEMM peak and every ratio depend on it (this project's CPU runs
    have seen 2-core VMs whose f32 GEMM peaks differ 2x)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one local device: the override, the table, or (CPU) a timed GEMM
    shared by the simulated devices. None for an unknown accelerator."""
    if override_tflops > 0:
        return override_tflops * 1e12
    device = jax.local_devices()[0]
    for prefix, tflops in _PEAK_TFLOPS:
        if device.device_kind.startswith(prefix):
            return tflops * 1e12
    if device.platform == "cpu":
        return measure_gemm_flops() / jax.local_device_count()
    return None


class Throughput:
    """Steps/s, examples/s, TFLOP/s per device and MFU over the steps since the last call."""

    def __init__(self, examples_per_step: int, flops_per_step: float | None, peak: float | None):
        self.examples_per_step = examples_per_step
        self.flops_per_step = flops_per_step
        self.peak = peak
        self._step: int | None = None
        self._time = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (previews, checkpoints) out of the rates."""
        self._time += seconds

    def start(self, step: int) -> None:
        """Start timing after `step` finished (call it after the first, compiling, step)."""
        self._step, self._time = step, time.perf_counter()

    def measure(self, step: int) -> dict[str, float]:
        if self._step is None or step <= self._step:
            return {}
        now = time.perf_counter()
        steps_per_sec = (step - self._step) / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        out = {"steps_per_sec": steps_per_sec,
               "examples_per_sec": steps_per_sec * self.examples_per_step}  # fmt: skip
        if self.flops_per_step:
            per_device = self.flops_per_step * steps_per_sec / jax.device_count()
            out["tflops_per_device"] = per_device / 1e12
            if self.peak:
                out["mfu"] = per_device / self.peak
        return out


# ---------------------------------------------------------------------------------------
# Image grids of latents


def _to_rgb(latents: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(n, h, w, c) latents -> (n, h, w, 3) in [0, 1], standardised by the row's target."""
    x = 0.5 + (latents - mean) / (4.0 * std)
    c = x.shape[-1]
    x = x[..., :3] if c >= 3 else np.repeat(x[..., :1], 3, axis=-1)
    return np.clip(x, 0.0, 1.0)


def latent_grid(columns: Sequence[np.ndarray], min_tile: int = 64, pad: int = 2) -> np.ndarray:
    """A (H, W, 3) float image: one row per example, one column per (n, h, w, c) array.

    Each row is normalised by the first column's per-channel mean and spread, so columns
    are comparable (a 3-channel latent is viewed directly as RGB; until a decoder exists,
    that is the only picture of a latent there is). Tiles are upscaled to >= `min_tile` px.
    """
    first = np.asarray(columns[0], np.float32)
    n, h, w, _ = first.shape
    mean = first.mean(axis=(1, 2), keepdims=True)
    std = first.std(axis=(1, 2), keepdims=True) + 1e-6
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    grid = np.ones((n * (th + pad) + pad, len(columns) * (tw + pad) + pad, 3), np.float32)
    for j, column in enumerate(columns):
        tiles = _to_rgb(np.asarray(column, np.float32), mean, std)
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
        for i in range(n):
            y, x = pad + i * (th + pad), pad + j * (tw + pad)
            grid[y : y + th, x : x + tw] = tiles[i]
    return grid
