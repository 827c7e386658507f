"""`sample.py --eval`: generate held-out clips driven by their own audio and score them.

Per clip of the split: reference = a random frame of the clip (seeded), every frame's
masked crop and audio window from the stage-1 records, DDIM sampling, decode. The paper's
six metrics (PSNR, SSIM, LPIPS, FID, LSE-C, LSE-D) in two tables:
  * composited, the paper's protocol (protocol.py): each generated crop pasted back into
    its source frame and the face crop re-taken with the stage-1 box (in crop space when
    the source video is not found, which the report's settings say);
  * raw crops: the decoded crops before paste-back.
LPIPS, FID and LSE need their networks' weights (else "unavailable" with the file looked
for); LSE needs the clips' speech, which the stage-1 dataset keeps (data/sources.py; for
datasets made before that, the synthetic set's through `--synthetic`). With the synthetic
set's ground truth (`--synthetic DIR`): the mouth-sync correlation and its shuffled-audio
control, measured by an expert fitted on the training identities.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dithead_jax.data.records import dataset_metadata, load_video_index, open_dataset
from dithead_jax.data.video_io import MediaError
from dithead_jax.evaluation.mouth import MouthExpert, sync_correlation
from dithead_jax.evaluation.protocol import (
    CROP_SPACE,
    PASTED,
    ClipSource,
    clip_source,
    composite,
    pasted_crops,
)
from dithead_jax.evaluation.report import write_report
from dithead_jax.evaluation.temporal import flicker, jitter

ROUND_TRIP = "frame VQGAN round trip"  # composited alongside the generated crops


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
    # Classifier-free guidance scales on audio (1 = off): every mode runs at every scale.
    guidance: tuple[float, ...] = (1.0,)
    # LSE without syncnet_v2's weights: a trained sync expert's workdir (sync_expert.py).
    sync_expert: Path | None = None
    # How faces are generated besides steps / mode / guidance (solver, spacing, precision,
    # memory bounds): a sampling.InferenceOptions (None: its defaults).
    inference: Any = None
    # Frame interpolation after the DiT (interpolation.py), every mode under each: "off",
    # "smooth", "half_rate" (the 25-fps ones; "double" changes the frame rate).
    interpolate: tuple[str, ...] = ("off",)


def _sampler_settings(inference: Any) -> dict[str, Any]:
    """The report's record of how faces were sampled, beyond steps and modes."""
    from dithead_jax.sampling import InferenceOptions

    inference = inference or InferenceOptions()
    return {"solver": inference.solver, "spacing": inference.spacing, "dtype": inference.dtype}


def variants(options: EvalOptions) -> list[tuple[str, str, float, str]]:
    """(name, reference mode, guidance scale, interpolation) of every row group, modes
    first; the name is the mode alone at scale 1 without interpolation (the reports of
    runs without guidance keep their keys), else e.g. "x0_same_step w=2 +smooth"."""
    return [
        (mode + (f" w={w:g}" if w != 1 else "") + (f" +{vfi}" if vfi != "off" else ""),
         mode, w, vfi)
        for mode in options.modes
        for w in options.guidance
        for vfi in options.interpolate
    ]  # fmt: skip


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
    crop_box: np.ndarray | None = None  # (T, 4) x0 y0 x1 y1 in the source frames
    source: ClipSource | None = None  # speech and source video (read_clips(with_sources))


def speech_layout(stage1: Path) -> str | None:
    """How the dataset keeps its videos' speech (data/sources.py), None if it does not."""
    try:
        return dataset_metadata(stage1).get("provenance", {}).get("speech")
    except FileNotFoundError:
        return None


def clip_lengths(
    stage1: Path, split: str, max_clips: int | None, max_frames: int | None
) -> list[int]:
    """Frame count of each clip `read_clips` would yield, from the index alone (every
    process draws the same references and shuffles without reading any frames)."""
    index = load_video_index(stage1, split)
    lengths = [int(n) for n in index["length"]]
    if max_clips is not None:
        lengths = lengths[:max_clips]
    return [min(n, max_frames) if max_frames else n for n in lengths]


def read_clips(
    stage1: Path,
    split: str,
    max_clips: int | None,
    max_frames: int | None,
    indices: Iterable[int] | None = None,
    *,
    with_sources: bool = False,
) -> Iterator[Clip]:
    """The split's clips in index order (only `indices` of them when given); with_sources:
    each with its speech and source video as the dataset keeps them (`Clip.source`)."""
    from dithead_jax.data.preprocess import safe_id

    source, _ = open_dataset(stage1, split)
    index = load_video_index(stage1, split)
    layout = speech_layout(stage1) if with_sources else None
    originals = index.get("source", index["video_id"])  # segments share their video's
    count = len(index["video_id"]) if max_clips is None else min(max_clips, len(index["video_id"]))
    for k in range(count) if indices is None else indices:
        start, length = int(index["start"][k]), int(index["length"][k])
        if max_frames:
            length = min(length, max_frames)
        records = [source[i] for i in range(start, start + length)]
        clip = Clip(
            video_id=str(index["video_id"][k]),
            identity=str(index["identity"][k]),
            frames=np.stack([r["frame"] for r in records]),
            masked=np.stack([r["masked_frame"] for r in records]),
            mask=np.stack([r["mask"] for r in records]),
            landmarks=np.stack([r["landmarks"] for r in records]),
            audio=np.stack([r["audio"] for r in records]),
            frame_index=np.array([r["frame_index"] for r in records]),
            crop_box=np.stack([r["crop_box"] for r in records]),
        )
        if with_sources:
            clip.source = clip_source(
                stage1, safe_id(str(originals[k])), layout, clip.frame_index,
                records[0]["source_size"],
            )  # fmt: skip
        yield clip


def lower_face_scores(
    real: np.ndarray, fake: np.ndarray, mask: np.ndarray, lpips: Any = None
) -> dict[str, float]:
    """Fidelity of the composite (what the dubbed video shows): its PSNR over the whole
    crop (the paper scores the final video's face crops so, crediting the untouched upper
    face), its PSNR over the pixels inside the mask (alpha >= 1/2: where it can differ) and,
    with an LPIPS scorer, its LPIPS on the lower half of the crop (outside the mask the
    composite is the real frame, so only the mask region moves it)."""
    comp = composite(real, fake, mask).astype(np.float64)
    inside = mask >= 128
    err = ((comp - real.astype(np.float64)) ** 2).mean(axis=-1)
    mse = float(err[inside].mean()) if inside.any() else 0.0
    whole = float(err.mean())  # the paper's protocol: the composited crop, upper face too
    scores = {
        "psnr_composite": float(10 * np.log10(255**2 / whole)) if whole > 0 else float("inf"),
        "psnr_lower": float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf"),
    }
    if lpips is not None:
        half = real.shape[1] // 2
        lower = composite(real, fake, mask)[:, half:]
        scores["lpips_lower"] = float(np.mean(lpips(real[:, half:], lower)))
    return scores


def _clip_speech(clip: Clip, options: EvalOptions, frames: int) -> tuple[np.ndarray | None, str]:
    """The 16 kHz speech under the clip's first `frames` frames: the dataset's, else the
    synthetic set's; (None, why) when neither has it."""
    if clip.source is not None and clip.source.speech is not None:
        return clip.source.speech[: frames * 640], ""
    if options.synthetic is not None:
        start = int(clip.frame_index[0]) * 640
        return _truth(options.synthetic, clip)["audio"][start : start + frames * 640], ""
    if clip.source is not None:
        return None, f"{clip.source.speech_missing}, or pass --synthetic"
    return None, "needs the clips' speech (a stage-1 dataset that keeps it, or --synthetic)"


def _composited(
    clip: Clip, fakes: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """The real crops and every fake composited by the paper's protocol (protocol.py):
    pasted back into the source video when the dataset found it, else in crop space; the
    third value says why it fell back ("" when pasted back)."""
    why = clip.source.video_missing if clip.source is not None else "no source video given"
    video = clip.source.video if clip.source is not None else None
    if video is not None and clip.crop_box is not None:
        try:
            real, pasted = pasted_crops(video, clip.frame_index, clip.crop_box, clip.mask, fakes)
            return real, pasted, ""
        except MediaError as e:
            why = str(e)
    return clip.frames, {k: composite(clip.frames, f, clip.mask) for k, f in fakes.items()}, why


def _image_scores(real: np.ndarray, fake: np.ndarray, lpips: Any) -> dict[str, float]:
    """Mean PSNR, SSIM and (with a scorer) LPIPS of the frames."""
    from dithead_jax.evaluation.image_metrics import psnr, ssim

    scores = {
        "psnr": float(np.asarray(psnr(real, fake)).mean()),
        "ssim": float(np.asarray(ssim(real, fake)).mean()),
    }
    if lpips is not None:
        scores["lpips"] = float(lpips(real, fake).mean())
    return scores


def _lse(scorer: Any, frames: np.ndarray, speech: np.ndarray | None, why: str) -> dict:
    if speech is None:
        return {"status": "unavailable", "reason": why}
    return scorer(frames, speech)


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


def _fid_extractor(options: EvalOptions) -> tuple[Any, str | None]:
    """(extractor, None), or (None, why FID is not computed)."""
    from dithead_jax.evaluation import fid as fid_lib

    if "fid" not in options.metrics:
        return None, "not asked (--metrics)"
    try:
        return fid_lib.load_feature_extractor(), None
    except FileNotFoundError as e:
        return None, str(e)


@dataclasses.dataclass
class _Scorers:
    """What scores a clip; built identically on every process."""

    lpips: Any
    expert: MouthExpert | None
    fid: Any  # FIDFeatureExtractor | None
    lse: Any  # SyncScorer | None (None: not asked, or no raw audio to score against)


def _score_clip(
    models: Any,
    clip: Clip,
    reference: np.ndarray,
    shuffle: np.ndarray,
    scorers: _Scorers,
    out_dir: Path,
    options: EvalOptions,
) -> dict[str, Any]:
    """Everything the report needs from one clip, as plain numbers and small arrays (this
    is what travels between processes): per mode its table row (raw and composited
    scores), s/frame, LSE and the expert's predictions; for the first mode FID features;
    the clip's sync references. "Mode" here is a `variants` entry: a reference mode at one
    guidance scale."""
    from dithead_jax.evaluation.image_metrics import psnr
    from dithead_jax.sampling import generate_faces, reconstruct_faces

    expert = scorers.expert
    truth = _truth(options.synthetic, clip)["mouth_open"] if expert is not None else None
    out: dict[str, Any] = {"rows": {}, "seconds": {}, "measured": {}, "control": {}}
    # The frame VQGAN's round trip: the best any DiT sample can look (a side-by-side column
    # and the ceiling row of the report).
    rebuilt = reconstruct_faces(models, clip.frames)
    names = [name for name, *_ in variants(options)]
    fakes = {}
    for name, mode, w, vfi in variants(options):
        how = dict(options=options.inference, steps=options.steps, mode=mode, guidance=w,
                   interpolate=vfi, seed=options.seed, landmarks=clip.landmarks,
                   masks=clip.mask)  # fmt: skip
        started = time.perf_counter()
        fakes[name] = generate_faces(models, clip.masked, clip.audio, reference, **how)
        out["seconds"][name] = (time.perf_counter() - started) / len(fakes[name])
        if expert is not None:
            control = generate_faces(models, clip.masked, clip.audio[shuffle], reference, **how)
            out["measured"][name] = expert.predict(fakes[name], clip.landmarks)
            out["control"][name] = expert.predict(control, clip.landmarks)
    # Every fake (and the round trip) through one pass over the source video.
    real, composited, out["crop_space"] = _composited(clip, fakes | {ROUND_TRIP: rebuilt})
    speech, no_speech = _clip_speech(clip, options, len(clip.frames))
    out["round_trip"] = {
        "psnr": float(np.asarray(psnr(clip.frames, rebuilt)).mean()),
        "composited_psnr": float(np.asarray(psnr(real, composited[ROUND_TRIP])).mean()),
        **lower_face_scores(clip.frames, rebuilt, clip.mask, scorers.lpips),
    }
    for name in names:
        fake, comp = fakes[name], composited[name]
        row = {"video": clip.video_id, "mode": name, "frames": len(fake)}
        row |= _image_scores(clip.frames, fake, scorers.lpips)
        row["flicker"] = flicker(clip.frames, fake, clip.mask)
        row["jitter"] = jitter(clip.frames, fake, clip.mask)
        row |= lower_face_scores(clip.frames, fake, clip.mask, scorers.lpips)
        row |= {f"composited_{k}": v for k, v in _image_scores(real, comp, scorers.lpips).items()}
        if expert is not None:
            row["sync"] = sync_correlation(out["measured"][name], truth)
        out["rows"][name] = row
        if scorers.lse is not None:  # every mode: the sync expert's verdict per recipe
            out.setdefault("lse_modes", {})[name] = _lse(scorers.lse, fake, speech, no_speech)
            out.setdefault("composited_lse_modes", {})[name] = _lse(
                scorers.lse, comp, speech, no_speech
            )
        if name != names[0]:
            continue
        if scorers.lse is not None:
            out["lse"] = out["lse_modes"][name]
            out["composited_lse"] = out["composited_lse_modes"][name]
            out["lse_real"] = _lse(scorers.lse, clip.frames, speech, no_speech)  # the ceiling
        if scorers.fid is not None:
            out["fid"] = (scorers.fid(clip.frames), scorers.fid(fake))
            out["composited_fid"] = (scorers.fid(real), scorers.fid(comp))
        if options.side_by_side:
            _side_by_side(out_dir, clip, rebuilt, fake, speech)
    if expert is not None:
        # What a perfect DiT could reach: the expert on real frames (calibration) and on
        # real frames passed through the frame VQGAN (the decoder's ceiling).
        out["truth"] = truth
        out["real"] = expert.predict(clip.frames, clip.landmarks)
        out["rebuilt"] = expert.predict(rebuilt, clip.landmarks)
    return out


def allgather_objects(value: Any) -> list[Any]:
    """`value` of every process, in process order, on every process (picklable values).

    One fixed-size collective after a size exchange: `process_allgather` needs equal
    shapes everywhere, so each pickle is padded to the longest. Single process: [value].
    """
    import jax

    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    payload = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32([payload.size]))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # (processes, longest)
    return [pickle.loads(gathered[p, : sizes[p]].tobytes()) for p in range(len(sizes))]


def evaluate(models: Any, stage1: Path, out_dir: Path, options: EvalOptions) -> dict[str, Any]:
    """Generates, scores, writes report.json / report.md / side-by-side mp4s; returns the report.

    Under `jax.distributed` every process generates and scores a contiguous share of the
    clips on its own devices (each writes its clips' side-by-side videos); the per-clip
    results are gathered and every process builds the same report from them in clip
    order, so it equals a one-process run's. Only process 0 writes report.json / .md.
    """
    import jax

    from dithead_jax.evaluation.sync import make_sync_scorer

    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = clip_lengths(stage1, options.split, options.max_clips, options.max_frames)
    if not lengths:
        raise ValueError(f"{stage1}: no clips in split {options.split!r}")
    # One reference frame and one audio shuffle per clip, shared by every mode compared,
    # drawn for all clips on every process (the same numbers whatever the process count).
    rng = np.random.default_rng(options.seed)
    reference_at = [int(rng.integers(n)) for n in lengths]
    shuffles = [rng.permutation(n) for n in lengths]

    lpips, lpips_missing = _lpips_scorer() if "lpips" in options.metrics else (None, "not asked")
    expert = None
    if options.synthetic is not None:
        expert = fit_mouth_expert(stage1, options.synthetic)
    extractor, fid_missing = _fid_extractor(options)
    lse = {"status": "unavailable", "reason": "not asked (--metrics)"}
    lse_scorer = None
    if "lse" in options.metrics:
        lse_scorer, lse = make_sync_scorer(options.sync_expert, stage1), None
        if not lse_scorer.available:
            lse, lse_scorer = {"status": "unavailable", "reason": lse_scorer.reason}, None
    scorers = _Scorers(lpips=lpips, expert=expert, fid=extractor, lse=lse_scorer)

    process, processes = jax.process_index(), jax.process_count()
    mine = [int(k) for k in np.array_split(np.arange(len(lengths)), processes)[process]]
    desc = "clips" if processes == 1 else f"clips (process {process}/{processes})"
    results = [
        (k, _score_clip(models, clip, clip.frames[reference_at[k]], shuffles[k],
                        scorers, out_dir, options))
        for k, clip in zip(mine, tqdm(
            read_clips(stage1, options.split, options.max_clips, options.max_frames, mine,
                       with_sources=True),
            desc=desc, unit="clip", total=len(mine)), strict=True)
    ]  # fmt: skip
    clips = [r for _, r in sorted(kr for part in allgather_objects(results) for kr in part)]
    report = _report(clips, options, lse, lpips_missing, fid_missing, extractor is not None)
    if process == 0:
        write_report(out_dir, report)
    return report


def _report(
    clips: list[dict[str, Any]],
    options: EvalOptions,
    lse: dict[str, Any] | None,
    lpips_missing: str | None,
    fid_missing: str | None,
    with_fid: bool,
) -> dict[str, Any]:
    """The report from every clip's `_score_clip` result, in clip order: `metrics` (raw
    crops, with the lower-face diagnostics) and `metrics_composited` (the paper's protocol)
    hold the six metrics of the first mode; `modes` every mode's summary."""
    synced = "truth" in clips[0]
    truth = np.concatenate([c["truth"] for c in clips]) if synced else None
    rows, per_mode = [], {}
    names = [name for name, *_ in variants(options)]
    for mode in names:
        mode_rows = [c["rows"][mode] for c in clips]
        rows += mode_rows
        summary = {
            "psnr": float(np.mean([r["psnr"] for r in mode_rows])),
            "ssim": float(np.mean([r["ssim"] for r in mode_rows])),
        }
        for key in ("lpips", "psnr_composite", "psnr_lower", "lpips_lower", "composited_psnr",
                    "composited_ssim", "composited_lpips"):  # fmt: skip
            if key in mode_rows[0]:
                summary[key] = float(np.mean([r[key] for r in mode_rows]))
        if synced:
            measured = np.concatenate([c["measured"][mode] for c in clips])
            summary["sync"] = sync_correlation(measured, truth)
            control = np.concatenate([c["control"][mode] for c in clips])
            summary["sync_control"] = sync_correlation(control, truth)
        for prefix in ("", "composited_"):
            if f"{prefix}lse_modes" in clips[0]:
                lse_mode = _mean_lse([c[f"{prefix}lse_modes"][mode] for c in clips])
                if lse_mode.get("status") == "ok":
                    summary[f"{prefix}lse_c"] = lse_mode["lse_c"]
                    summary[f"{prefix}lse_d"] = lse_mode["lse_d"]
        for key in ("flicker", "jitter"):
            summary[key] = float(np.nanmean([r[key] for r in mode_rows]))
        # The first clip's time includes compiling this mode's sampler.
        summary["s_per_frame"] = float(np.median([c["seconds"][mode] for c in clips]))
        per_mode[mode] = summary

    first = per_mode[names[0]]
    unavailable = {}
    if lpips_missing is not None:
        unavailable["lpips"] = lpips_missing
    if not with_fid:
        unavailable["fid"] = fid_missing
    lse_raw = lse_composited = lse
    if lse is None and "lse" in clips[0]:
        lse_raw = _mean_lse([c["lse"] for c in clips])
        lse_composited = _mean_lse([c["composited_lse"] for c in clips])
    if lse_raw is None or lse_raw.get("status") != "ok":
        reason = (lse_raw or {}).get("reason", "not computed (no sync scorer)")
        unavailable["lse_c"] = unavailable["lse_d"] = reason
    metrics = _table(first, "", clips, with_fid, lse_raw)
    metrics |= {k: first[k] for k in ("psnr_composite", "psnr_lower", "lpips_lower") if k in first}
    settings = {
        "split": options.split,
        "clips": len(clips),
        "steps": options.steps,
        "modes": ", ".join(options.modes),
        **_sampler_settings(options.inference),
        "seed": options.seed,
    }
    if options.interpolate != ("off",):
        settings["interpolate"] = ", ".join(options.interpolate)
    if options.guidance != (1.0,):
        settings["guidance"] = ", ".join(f"{w:g}" for w in options.guidance)
    if lse_raw is not None and lse_raw.get("status") == "ok":
        settings["lse_expert"] = lse_raw.get("expert", "syncnet_v2")  # whose LSE these are
    fell_back = [c["crop_space"] for c in clips if c["crop_space"]]
    settings["composited"] = PASTED
    if fell_back:
        settings["composited"] = (
            f"{CROP_SPACE} for {len(fell_back)} of {len(clips)} clips: {fell_back[0]}"
        )
    report = {
        "settings": settings,
        "metrics": metrics,
        "metrics_composited": _table(first, "composited_", clips, with_fid, lse_composited),
        "unavailable": unavailable,
        "clips": rows,
        # Per mode (one or several): its summary, sync, flicker, jitter and s/frame.
        "modes": per_mode,
        # LSE of the real frames with their own audio: what the expert reads at best.
        "lse_real": _mean_lse([c["lse_real"] for c in clips]) if "lse_real" in clips[0] else None,
        # The same scores for the frame VQGAN's round trips of the real frames.
        "round_trip": {
            key: float(np.mean([c["round_trip"][key] for c in clips]))
            for key in clips[0]["round_trip"]
        },
    }
    if synced:
        report["sync"] = {
            "correlation": first["sync"],
            "control_correlation": first["sync_control"],
            "expert_calibration": sync_correlation(
                np.concatenate([c["real"] for c in clips]), truth
            ),
            "vqgan_ceiling": sync_correlation(np.concatenate([c["rebuilt"] for c in clips]), truth),
        }
    return report


def _table(
    first: dict[str, Any],
    prefix: str,
    clips: list[dict[str, Any]],
    with_fid: bool,
    lse: dict[str, Any] | None,
) -> dict[str, float | None]:
    """The six Table-1 metrics of one protocol (prefix "" raw crops, "composited_"): image
    scores from the first mode's summary, FID over every clip's frames, the mean LSE."""
    from dithead_jax.evaluation import fid as fid_lib

    table = {k: first.get(prefix + k) for k in ("psnr", "ssim", "lpips")}
    table["fid"] = None
    if with_fid:
        real, fake = fid_lib.FIDAccumulator(), fid_lib.FIDAccumulator()
        for c in clips:
            real.update(c[prefix + "fid"][0])
            fake.update(c[prefix + "fid"][1])
        table["fid"] = fid_lib.compute_fid(real, fake).value
    ok = lse is not None and lse.get("status") == "ok"
    table["lse_c"], table["lse_d"] = (lse["lse_c"], lse["lse_d"]) if ok else (None, None)
    return table


def _mean_lse(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean LSE over clips, or the first clip's reason it could not be scored."""
    for result in results:
        if result.get("status") != "ok":
            return result
    return {
        "status": "ok",
        "lse_c": float(np.mean([r["lse_c"] for r in results])),
        "lse_d": float(np.mean([r["lse_d"] for r in results])),
        "expert": results[0].get("expert", "syncnet_v2"),
    }


def _side_by_side(
    out_dir: Path, clip: Clip, rebuilt: np.ndarray, fake: np.ndarray, speech: np.ndarray | None
) -> None:
    """ground truth | masked input | VQGAN round trip | generated, with the clip's speech
    when known: which stage loses the face shows at a glance."""
    from dithead_jax.data.video_io import write_video

    frames = np.concatenate([clip.frames, clip.masked, rebuilt, fake], axis=2)
    name = clip.video_id.replace("+", "_").replace("/", "_")
    write_video(out_dir / f"{name}.mp4", frames, 25, speech, 16_000)
