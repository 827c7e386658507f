"""Video frame interpolation in generation (stage 3): RIFE's IFNet after the DiT.

    off        the DiT's frames as they are (evaluation tables: LSE and SyncNet need 25 fps)
    double     2x the frame rate (the paper's setting): between every two output frames,
               their interpolation at t = 0.5, on the pasted-back frames (`FrameDoubler`)
    smooth     same frame rate; each generated face crop blended, inside its lower-face
               mask only, with the interpolation of its two neighbours (`FacePost`)
    half_rate  the DiT generates every other frame; the interpolator fills the rest
               (`FacePost`): half the DiT's cost

`smooth` and `half_rate` work on the face crops, before paste-back: the interpolator then
sees what it was trained on (stage-1 crops), costs (crop / frame)^2 of a full-frame pass
(64^2 of a 128^2 demo frame: 1/4; 256^2 of 720p: 1/14), and nothing outside the mask can
change. `double` must make frames the source video does not have, so it interpolates the
whole output frame, as the paper's RIFE pass over the finished video does.

Both streams hold back one frame (a frame is final once its right neighbour exists) and
give it at `flush()`, so chunked generation equals whole-clip generation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MODES = ("off", "double", "smooth", "half_rate")
# How much of the neighbours' interpolation replaces a generated face inside its mask under
# `smooth`: 1/2 halves a frame's own deviation from its neighbours' line (its jitter) and
# keeps half of its own audio-driven detail.
SMOOTH_WEIGHT = 0.5
# The trained demo interpolator next to a DiT run (demo.py trains it there), like the
# sync expert: `<run>/../vfi`.
RUN_NEIGHBOUR = "vfi"


class Interpolator:
    """A jitted IFNet on uint8 frames: `interpolator(a, b, t)` -> the frames at t between
    a and b, (N, H, W, 3) each. Pairs go through in batches of `batch` (the last padded),
    so one compiled program serves every chunk of a clip."""

    def __init__(self, model, batch: int = 8, source: str = ""):
        import jax  # here: the CLIs import MODES before jax.distributed starts
        import jax.numpy as jnp
        from flax import nnx

        graphdef, state = nnx.split(model)
        self.batch, self.source = batch, source

        @jax.jit
        def run(state, a, b, t):
            frames = nnx.merge(graphdef, state)(a / 255.0, b / 255.0, t)
            return jnp.clip(jnp.round(frames * 255.0), 0, 255).astype(jnp.uint8)

        self._run, self._state = run, state

    def __call__(self, a: np.ndarray, b: np.ndarray, t: float = 0.5) -> np.ndarray:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.ndim != 4:
            raise ValueError(f"want two (N, H, W, 3) frame stacks, got {a.shape}, {b.shape}")
        out = []
        for start in range(0, len(a), self.batch):
            pair = [x[start : start + self.batch].astype(np.float32) for x in (a, b)]
            n = len(pair[0])
            pad = [(0, self.batch - n)] + [(0, 0)] * 3
            padded = [np.pad(x, pad) for x in pair]
            out.append(np.asarray(self._run(self._state, *padded, np.float32(t)))[:n])
        return np.concatenate(out) if out else np.zeros_like(a)


def find_interpolator(run_dir: str | os.PathLike | None) -> Path | None:
    """A trained interpolator next to a run: `<run_dir>/../vfi` holding checkpoints."""
    from dithead_jax.runs import neighbour_run

    return neighbour_run(run_dir, RUN_NEIGHBOUR)


def load_interpolator(path: str | os.PathLike | None, run_dir: str | None = None) -> Interpolator:
    """An `Interpolator` from `path`: a `train.py --config configs/vfi.py` workdir, or a
    Practical-RIFE `flownet.pkl`. None: the workdir next to `run_dir` (`find_interpolator`),
    else the released weights looked up as `rife_flownet.pkl` (`$DITHEAD_WEIGHTS`); a miss
    names every place it looked."""
    from dithead_jax.convert.rife_weights import load_rife

    if path is None:
        path = find_interpolator(run_dir)
    if path is None:
        try:
            return Interpolator(load_rife(), source="rife_flownet.pkl")
        except FileNotFoundError as e:
            hint = f" or {Path(run_dir).parent / RUN_NEIGHBOUR}" if run_dir else ""
            raise FileNotFoundError(
                f"no frame interpolator: train one (train.py --config configs/vfi.py:demo) "
                f"and pass its workdir{hint}, or {e}"
            ) from None
    path = Path(path)
    if path.is_dir():
        from dithead_jax.training.vfi_train import load_model

        if not (path / "checkpoints").is_dir():
            raise FileNotFoundError(f"{path}: not a VFI run (no checkpoints/ in it)")
        return Interpolator(load_model(path), source=str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such interpolator (a VFI workdir or flownet.pkl)")
    return Interpolator(load_rife(path), source=str(path))


class FacePost:
    """`smooth` / `half_rate` on a clip's generated face crops, streamed in order.

    push(faces, masks): faces[i] a generated (S, S, 3) uint8 crop, or None for a frame the
    DiT skipped (`half_rate`); masks (C, S, S) uint8 alpha of the lower face. Returns the
    faces that are final, in order (a frame needs its right neighbour); `flush()` returns
    the rest. A clip that ends on a skipped frame repeats the frame before it there (one
    frame, 40 ms: generating it alone would cost a whole sampler pass)."""

    def __init__(self, mode: str, interpolator: Interpolator | None):
        if mode not in ("off", "smooth", "half_rate"):
            raise ValueError(f"FacePost runs off, smooth or half_rate, not {mode!r}")
        if mode != "off" and interpolator is None:
            raise ValueError(f"interpolate={mode!r} needs an interpolator")
        self.mode, self.interpolate = mode, interpolator
        self.faces: list[np.ndarray | None] = []  # the frames not yet final, oldest first
        self.masks: list[np.ndarray] = []
        self.previous: np.ndarray | None = None  # the last final frame's raw face
        self.size: tuple[int, ...] = (0, 0)  # the crops'

    def push(self, faces: Sequence[np.ndarray | None], masks: np.ndarray) -> np.ndarray:
        self.faces += list(faces)
        self.masks += list(masks)
        self.size = tuple(np.shape(masks)[1:3]) or self.size
        return self._emit(final=False)

    def flush(self) -> np.ndarray:
        if self.faces and self.faces[-1] is None:
            before = [f for f in [self.previous, *self.faces[:-1]] if f is not None]
            self.faces[-1] = before[-1]  # alternation: a generated frame precedes it
        return self._emit(final=True)

    def _emit(self, final: bool) -> np.ndarray:
        if self.mode == "off":
            out, self.faces, self.masks = self.faces, [], []
            return self._stack(out)
        # Buffer frames 0..k-1 are final: a smoothed frame needs its right neighbour, a
        # skipped one (half_rate) its right generated neighbour; at the end, all are.
        n = len(self.faces)
        if final:
            k = n
        elif self.mode == "smooth":
            k = n - 1
        else:
            k = n - 1 if n and self.faces[-1] is None else n
        if k <= 0:
            return self._stack([])
        out = self._finish([self.previous, *self.faces[: k + 1]], k)
        self.previous = self.faces[k - 1] if self.faces[k - 1] is not None else out[-1]
        self.faces, self.masks = self.faces[k:], self.masks[k:]
        return out

    def _finish(self, window: list, k: int) -> np.ndarray:
        """Final faces of buffer frames 0..k-1; window[j + 1] is buffer frame j."""
        faces = list(window[1 : k + 1])
        # (position, left, right) of every frame made or blended from its neighbours.
        todo = []
        for j in range(k):
            left, right = window[j], window[j + 2] if j + 2 < len(window) else None
            if self.mode == "half_rate":
                needed = faces[j] is None  # generated frames stay as they are
            else:
                needed = left is not None and right is not None  # the clip's ends stay
            if needed:
                todo.append((j, left, right))
        if todo:
            middle = self.interpolate(
                np.stack([t[1] for t in todo]), np.stack([t[2] for t in todo])
            )
            for (j, _, _), mid in zip(todo, middle, strict=True):
                if faces[j] is None:
                    faces[j] = mid
                else:  # smooth: inside the mask only
                    alpha = SMOOTH_WEIGHT * self.masks[j][..., None].astype(np.float32) / 255
                    blend = faces[j] * (1 - alpha) + mid.astype(np.float32) * alpha
                    faces[j] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
        return np.stack(faces)

    def _stack(self, faces: list) -> np.ndarray:
        return np.stack(faces) if faces else np.zeros((0, *self.size, 3), np.uint8)


class FrameDoubler:
    """`double` on whole output frames, streamed: push(frames) returns, for each frame that
    has a predecessor, the interpolation at t = 0.5 and then the frame (the first frame
    alone); 2N - 1 frames for N."""

    def __init__(self, interpolator: Interpolator):
        self.interpolate = interpolator
        self.last: np.ndarray | None = None

    def push(self, frames: np.ndarray) -> np.ndarray:
        if not len(frames):
            return frames
        lefts = np.concatenate([[self.last], frames[:-1]]) if self.last is not None else frames[:-1]
        rights = frames if self.last is not None else frames[1:]
        middles = self.interpolate(lefts, rights) if len(lefts) else frames[:0]
        out = [] if self.last is not None else [frames[0]]
        for middle, frame in zip(middles, rights, strict=True):
            out += [middle, frame]
        self.last = frames[-1]
        return np.stack(out)
