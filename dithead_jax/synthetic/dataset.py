"""Writes a synthetic talking-face dataset: mp4 + npz per clip and an index with splits.

Layout under `out`:
    index.json                       every clip, identity metadata, train/test split
    <identity>/<clip>.mp4            H.264 25 fps + AAC speech of exactly the same duration
    <identity>/<clip>.npz            landmarks (T, 68, 2), mouth_open (T,), viseme (T,), ...

Identity i and clip k are seeded from (seed, i) and (seed, i, k) only, so adding identities
or clips never changes the ones already there, and a re-run skips finished clips.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dithead_jax.config import SyntheticConfig
from dithead_jax.data.video_io import atomic_path, write_video
from dithead_jax.synthetic.face import Identity
from dithead_jax.synthetic.render import DEFAULT_PALETTE, Palette, RenderedClip, render_clip
from dithead_jax.synthetic.speech import PHONEMES, Segment, random_utterance, synthesize


def identity_name(index: int) -> str:
    return f"id{index:03d}"


def clip_name(index: int) -> str:
    return f"clip{index:03d}"


def make_identity(cfg: SyntheticConfig, index: int) -> Identity:
    return Identity.sample(np.random.default_rng([cfg.seed, index]))


def test_identities(cfg: SyntheticConfig) -> list[int]:
    """Held-out identities: the last ceil(fraction * N), none if there is only one."""
    if cfg.identities < 2 or cfg.test_fraction <= 0:
        return []
    count = min(cfg.identities - 1, max(1, math.ceil(cfg.test_fraction * cfg.identities)))
    return list(range(cfg.identities - count, cfg.identities))


def num_frames(cfg: SyntheticConfig) -> int:
    return max(1, round(cfg.seconds * cfg.fps))


def clip_paths(out: Path, identity: int, clip: int) -> tuple[Path, Path]:
    stem = out / identity_name(identity) / clip_name(clip)
    return stem.with_suffix(".mp4"), stem.with_suffix(".npz")


def render_synthetic_clip(
    cfg: SyntheticConfig, identity: int, clip: int, palette: Palette = DEFAULT_PALETTE
) -> tuple[RenderedClip, np.ndarray, list[Segment]]:
    """Renders clip `clip` of identity `identity` in memory: frames, speech, phonemes."""
    ident = make_identity(cfg, identity)
    rng = np.random.default_rng([cfg.seed, identity, clip])
    frames_count = num_frames(cfg)
    num_samples = frames_count * cfg.sample_rate // cfg.fps
    segments = random_utterance(rng, ident.voice, num_samples, cfg.sample_rate)
    audio = synthesize(segments, ident.voice, cfg.sample_rate, rng)
    rendered = render_clip(
        ident, segments, frames_count, cfg.fps, cfg.sample_rate, cfg.size, rng, palette
    )
    return rendered, audio, segments


def generate_clip(cfg: SyntheticConfig, out: Path, identity: int, clip: int) -> dict:
    """Renders, encodes and writes one clip (skipped if already complete); returns its entry."""
    video_path, meta_path = clip_paths(out, identity, clip)
    frames_count = num_frames(cfg)
    entry = {
        "identity": identity_name(identity),
        "clip": clip_name(clip),
        "video": str(video_path.relative_to(out)),
        "annotations": str(meta_path.relative_to(out)),
        "num_frames": frames_count,
        "duration": frames_count / cfg.fps,
    }
    # The npz is written last, so its presence means the clip is complete.
    if meta_path.exists() and video_path.exists():
        return entry
    rendered, audio, segments = render_synthetic_clip(cfg, identity, clip)
    write_video(video_path, rendered.frames, cfg.fps, audio, cfg.sample_rate)
    with atomic_path(meta_path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            landmarks=rendered.landmarks,
            mouth_open=rendered.mouth_open,
            viseme=rendered.viseme,
            articulation=rendered.articulation,
            pose=rendered.pose,
            eye_open=rendered.eye_open,
            audio=audio,
            phoneme=np.array([s.phoneme for s in segments]),
            phoneme_start=np.array([s.start for s in segments], np.int64),
            phoneme_end=np.array([s.end for s in segments], np.int64),
            identity=np.array(identity_name(identity)),
            identity_index=np.array(identity, np.int32),
            fps=np.array(cfg.fps, np.int32),
            sample_rate=np.array(cfg.sample_rate, np.int32),
        )
    return entry


def _generate_clip_star(args: tuple) -> dict:
    return generate_clip(*args)


def generate_dataset(cfg: SyntheticConfig, out: str | Path, workers: int = 1) -> dict:
    """Renders every (identity, clip) of `cfg` into `out` and writes `index.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, out, i, k) for i in range(cfg.identities) for k in range(cfg.clips)]
    progress = dict(total=len(jobs), desc="synthetic clips", unit="clip")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            entries = list(tqdm(pool.imap(_generate_clip_star, jobs), **progress))
    else:
        entries = [generate_clip(*job) for job in tqdm(jobs, **progress)]
    held_out = {identity_name(i) for i in test_identities(cfg)}
    for entry in entries:
        entry["split"] = "test" if entry["identity"] in held_out else "train"
    identities = {}
    for i in range(cfg.identities):
        ident = make_identity(cfg, i)
        identities[identity_name(i)] = {
            "split": "test" if identity_name(i) in held_out else "train",
            "hair_style": ident.hair_style,
            "skin": [round(c) for c in ident.skin],
            "voice": {k: round(v, 4) for k, v in dataclasses.asdict(ident.voice).items()},
        }
    index = {
        "format": "dithead_jax synthetic talking faces v1",
        "config": dataclasses.asdict(cfg),
        "landmarks": "iBUG-68, (x, y) in video pixels, pixel centres at integer coordinates",
        "visemes": {v.name.lower(): int(v) for v in sorted({p.viseme for p in PHONEMES.values()})},
        "identities": identities,
        "splits": {
            split: sorted(n for n, m in identities.items() if m["split"] == split)
            for split in ("train", "test")
        },
        "clips": entries,
    }
    with atomic_path(out / "index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return index
