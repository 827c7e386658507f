"""Fréchet Inception Distance (Heusel et al. 2017) over video frames, pytorch-fid compatible.

    features  pool3 (2048-d) of the TF-FID Inception-v3 (`dithead_jax.models.inception`)
    stats     mean and sample covariance (ddof 1, as np.cov) in float64, streamed over batches
    FID       ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))

Protocol, per frame (details and the "tf" variant in `dithead_jax.models.inception`):
uint8 RGB (h, w, 3) exactly as written to disk -> /255 -> bilinear resize to 299x299 as
torch's F.interpolate(align_corners=False, no antialias), kept in float (no re-quantisation)
-> 2v - 1 -> network. Frames must be uint8 on purpose: quantise generated frames the way the
video writer does, so the metric sees what a viewer sees.

Missing weights never produce a number: `compute_fid` then returns a result with
`value=None` and `unavailable` naming every file it looked for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import scipy.linalg
from flax import nnx

from dithead_jax.convert.inception_weights import (
    fid_weight_candidates,
    inception_from_file,
    resolve_fid_weights,
)
from dithead_jax.convert.weights import candidate_paths
from dithead_jax.models.inception import FEATURE_DIM, FIDInceptionV3, Protocol, preprocess

# --------------------------------------------------------------------------- statistics


class FIDAccumulator:
    """Streaming mean / covariance of feature vectors, float64.

    Batches merge with Chan et al.'s pairwise update (mean and centred scatter matrix), so
    no E[xx^T] - mu mu^T cancellation and the result equals np.mean / np.cov of all rows
    regardless of how they were batched.
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim, np.float64)
        self._scatter = np.zeros((dim, dim), np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, features: np.ndarray) -> FIDAccumulator:
        """Add rows of `features` (n, dim)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) features, got {f.shape}")
        if len(f) == 0:
            return self
        mean = f.mean(axis=0)
        centred = f - mean
        self._combine(len(f), mean, centred.T @ centred)
        return self

    def merge(self, other: FIDAccumulator) -> FIDAccumulator:
        """Add everything `other` has seen (e.g. from another host or shard)."""
        if other.dim != self.dim:
            raise ValueError(f"dims differ: {self.dim} vs {other.dim}")
        if other.count:
            self._combine(other.count, other._mean, other._scatter)
        return self

    def _combine(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        total = self.count + n
        delta = mean - self._mean
        self._scatter += scatter + np.outer(delta, delta) * (self.count * n / total)
        self._mean += delta * (n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no features accumulated")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """Sample covariance (ddof 1), as pytorch-fid's np.cov(rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 features, have {self.count}")
        return self._scatter / (self.count - 1)

    def save(self, path: str | Path) -> None:
        """npz with pytorch-fid's keys `mu`, `sigma` (+ `count`): usable by pytorch-fid."""
        np.savez_compressed(path, mu=self.mean, sigma=self.covariance, count=self.count)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an npz of pytorch-fid's format (ours or pytorch-fid's)."""
    with np.load(path) as f:
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    sqrt(sigma1 sigma2) by scipy.linalg.sqrtm, as pytorch-fid, so numbers are comparable:
    - if the product is so singular that sqrtm gives non-finite values, retry with
      eps * I added to both covariances;
    - a real PSD product can come back with a tiny imaginary part (rounding in the complex
      Schur form); it is dropped if the diagonal's imaginary parts are below 1e-3, else
      this raises instead of returning a wrong number.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not fit {mu1.shape}")

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrt(sigma1 sigma2) has an imaginary component {worst:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------- features


@functools.partial(jax.jit, static_argnames=("graphdef", "protocol"))
def _features(
    graphdef: nnx.GraphDef, state: nnx.State, frames: jax.Array, protocol: Protocol
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model(preprocess(frames, protocol))


class FIDFeatureExtractor:
    """pool3 features of uint8 frames, in fixed-size jitted batches.

    Every call pads its last batch to `batch_size`, so one compiled program per frame size
    serves any number of frames.
    """

    def __init__(
        self,
        model: FIDInceptionV3,
        protocol: Protocol = "pytorch-fid",
        batch_size: int = 8,
        weights: str | None = None,
    ):
        self.graphdef, self.state = nnx.split(model)
        self.protocol = protocol
        self.batch_size = batch_size
        self.weights = weights  # where the network came from, for reports

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(n, h, w, 3) uint8 -> (n, 2048) float32."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8:
            raise TypeError(
                f"FID frames must be uint8 (got {frames.dtype}); quantise generated frames "
                "as the video writer does, e.g. np.round((x + 1) * 127.5).clip(0, 255)"
            )
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected (n, h, w, 3) RGB frames, got {frames.shape}")
        out = []
        for start in range(0, len(frames), self.batch_size):
            batch = frames[start : start + self.batch_size]
            n = len(batch)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *batch.shape[1:]), np.uint8)
                batch = np.concatenate([batch, pad])
            # device_put: jnp.asarray(numpy) would dispatch a compiled copy per call
            features = _features(self.graphdef, self.state, jax.device_put(batch), self.protocol)
            out.append(np.asarray(features)[:n])
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)

    def accumulate(
        self, batches: Iterable[np.ndarray], accumulator: FIDAccumulator | None = None
    ) -> FIDAccumulator:
        """Feed every (n, h, w, 3) uint8 batch of `batches` into an accumulator."""
        accumulator = accumulator or FIDAccumulator()
        for batch in batches:
            accumulator.update(self(batch))
        return accumulator


def load_feature_extractor(
    weights: str | Path | None = None, protocol: Protocol = "pytorch-fid", batch_size: int = 8
) -> FIDFeatureExtractor:
    """Pretrained extractor; raises FileNotFoundError (naming the paths tried) without weights."""
    path = resolve_fid_weights(weights)
    return FIDFeatureExtractor(inception_from_file(path), protocol, batch_size, weights=str(path))


# --------------------------------------------------------------------------- the metric


@dataclasses.dataclass(frozen=True)
class FIDResult:
    """value is None exactly when the metric could not be computed (see `unavailable`)."""

    value: float | None
    num_real: int = 0
    num_fake: int = 0
    protocol: str = "pytorch-fid"
    weights: str | None = None
    unavailable: str | None = None  # why there is no value, naming the files looked for
    looked_for: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.value is not None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fid_weight_paths() -> tuple[str, ...]:
    """Every path `load_fid_inception()` tries, in order."""
    return tuple(str(p) for name in fid_weight_candidates() for p in candidate_paths(name))


# frames (n, h, w, 3) uint8 | an iterable of such batches | precomputed statistics
Frames = np.ndarray | Iterable[np.ndarray] | FIDAccumulator | tuple[np.ndarray, np.ndarray]


def _batches(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(frames, np.ndarray):
        yield frames
    else:
        yield from frames


def _is_stats(frames: Frames) -> bool:
    return isinstance(frames, FIDAccumulator | tuple)


def _stats(
    frames: Frames, extractor: FIDFeatureExtractor | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, frame count; 0 when only (mu, sigma) was given)."""
    if isinstance(frames, tuple):
        mu, sigma = frames  # e.g. `load_stats` of the real set's npz
        return np.asarray(mu, np.float64), np.asarray(sigma, np.float64), 0
    if not isinstance(frames, FIDAccumulator):
        assert extractor is not None
        frames = extractor.accumulate(_batches(frames))
    return frames.mean, frames.covariance, frames.count


def compute_fid(
    real: Frames,
    fake: Frames,
    *,
    weights: str | Path | None = None,
    protocol: Protocol = "pytorch-fid",
    batch_size: int = 8,
    extractor: FIDFeatureExtractor | None = None,
) -> FIDResult:
    """FID between two sets of frames.

    real, fake: a (n, h, w, 3) uint8 array, an iterable of such batches (streamed; the
    frame count is unbounded), a filled FIDAccumulator, or (mu, sigma) as `load_stats`
    returns (num_* is then 0). Two sets of statistics need no network. extractor: reuse a
    loaded network across calls; otherwise one is loaded from `weights` (None: the default
    search). Without weights the result is unavailable (value None), never a guess.
    """
    if extractor is None and not (_is_stats(real) and _is_stats(fake)):
        try:
            extractor = load_feature_extractor(weights, protocol, batch_size)
        except FileNotFoundError as e:
            looked_for = (str(weights),) if weights is not None else fid_weight_paths()
            return FIDResult(
                value=None, protocol=protocol, unavailable=str(e), looked_for=looked_for
            )
    mu_real, sigma_real, num_real = _stats(real, extractor)
    mu_fake, sigma_fake, num_fake = _stats(fake, extractor)
    return FIDResult(
        value=frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake),
        num_real=num_real,
        num_fake=num_fake,
        protocol=extractor.protocol if extractor else protocol,
        weights=extractor.weights if extractor else None,
    )
