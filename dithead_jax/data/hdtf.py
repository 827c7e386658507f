"""HDTF preparation: parse the published annotations, cut, crop and resample the raw videos.

HDTF (Zhang et al., CVPR 2021; GitHub repository MRzzm/HDTF, folder `HDTF_dataset/`) publishes no
video, only annotations per subset (RD = radio hosts, WDA / WRA = Democrat / Republican
addresses). Every file is one record per line, fields separated by single spaces:

    <SUBSET>_video_url.txt       Radio11 <url>                      (WDA's starts with a BOM)
    <SUBSET>_annotion_time.txt   Radio11.mp4 00:30-01:00 01:30-02:30   (sic "annotion"; some
                                 lines end in a space; one time range per clip, MM:SS)
    <SUBSET>_crop_wh.txt         Radio11_1.mp4 557 478 0 478        (clip = <video>_<index>;
                                 x width y height in pixels, always square; some clips have none)
    <SUBSET>_resolution.txt      Radio11.mp4 720                    (frame height the crops were
                                 measured at; 0 where unknown)
    <SUBSET>_crop_ratio.txt      Radio11_1.mp4 1.2                  (undocumented; not used)

Output: `out/<identity>/<SUBSET>_<video>_<index:03d>.mp4`, H.264 at the source's frame timing
+ AAC at the source's sample rate and channels (`data/preprocess.py` resamples to 25 fps and
16 kHz mono, with the reader sample.py uses, so nothing is resampled twice). Clip names
follow the community `download.py` in the HDTF repository.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import subprocess
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from dithead_jax.data.video_io import (
    MediaError,
    atomic_path,
    count_frames_at_fps,
    probe_video,
)

FPS = 25
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov")
# Subsets whose video names end in a per-person counter (AmyKlobuchar0, AmyKlobuchar1). RD's
# numbers (Radio1 … Radio59) tell different broadcasts apart, so they stay in the identity.
PERSON_COUNTER_SUBSETS = ("WDA", "WRA")
# A clip this much shorter than its annotated range (e.g. the download ends early) is reported.
SHORT_TOLERANCE_S = 1.0


class AnnotationError(ValueError):
    """A malformed annotation line; the message names the file and the line number."""


@dataclasses.dataclass(frozen=True)
class TimeRange:
    start: float  # seconds
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class CropBox:
    x: int
    y: int
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class HDTFClip:
    """One annotated clip and everything needed to cut it."""

    subset: str  # "RD" | "WDA" | "WRA"
    video: str  # HDTF video name, e.g. "AmyKlobuchar1"
    index: int  # clip index within the video (position on its annotation line)
    identity: str  # person, e.g. "WDA_AmyKlobuchar"; the unit of the train/test split
    name: str  # "WDA_AmyKlobuchar1_003"
    source: Path | None  # the downloaded raw video; None when it is not in the raw folder
    time: TimeRange
    crop: CropBox | None  # None where HDTF gives no crop: the full frame is kept
    resolution: int | None  # frame height the crop was measured at, None if unknown
    output: Path


# ----------------------------------------------------------------------------- parsing


def _records(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, stripped line, fields) for every non-blank line."""
    try:
        # utf-8-sig: WDA_video_url.txt starts with a byte-order mark that would else stick to
        # the first video name.
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read ({e})") from e
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line, line.split()


def _error(path: Path, number: int, line: str, message: str) -> AnnotationError:
    return AnnotationError(f"{path}:{number}: {message}: {line!r}")


def _strip_ext(name: str) -> str:
    return name[:-4] if name.lower().endswith(".mp4") else name


def parse_timestamp(text: str) -> float:
    """'MM:SS' (HDTF's form) or 'HH:MM:SS'; fractions of a second allowed."""
    parts = text.split(":")
    # A colon is required: a bare '0010' could mean seconds or a mistyped '00:10'.
    if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d+)?", p) for p in parts):
        raise ValueError(f"not a timestamp: {text!r}")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds


def parse_time_range(text: str) -> TimeRange:
    """'00:30-01:00' -> TimeRange(30, 60); the end must come after the start."""
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"not a START-END range: {text!r}")
    span = TimeRange(parse_timestamp(start), parse_timestamp(end))
    if span.end <= span.start:
        raise ValueError(f"range ends before it starts: {text!r}")
    return span


def _unique(table: dict, key: object, path: Path, number: int, line: str) -> None:
    if key in table:
        raise _error(path, number, line, f"{key} listed twice")


def read_video_urls(path: str | os.PathLike) -> dict[str, str]:
    """`<video> <url>` lines -> {video: url}."""
    path, urls = Path(path), {}
    for number, line, fields in _records(path):
        if len(fields) != 2 or not fields[1].startswith(("http://", "https://")):
            raise _error(path, number, line, "expected '<video> <url>'")
        _unique(urls, fields[0], path, number, line)
        urls[fields[0]] = fields[1]
    return urls


def read_annotation_times(path: str | os.PathLike) -> dict[str, list[TimeRange]]:
    """`<video>.mp4 MM:SS-MM:SS [MM:SS-MM:SS ...]` lines -> {video: [one range per clip]}."""
    path, times = Path(path), {}
    for number, line, fields in _records(path):
        if len(fields) < 2:
            raise _error(path, number, line, "expected '<video>.mp4 MM:SS-MM:SS ...'")
        try:
            spans = [parse_time_range(f) for f in fields[1:]]
        except ValueError as e:
            raise _error(path, number, line, str(e)) from None
        video = _strip_ext(fields[0])
        _unique(times, video, path, number, line)
        times[video] = spans
    return times


def read_crops(path: str | os.PathLike) -> dict[tuple[str, int], CropBox]:
    """`<video>_<index>.mp4 x width y height` lines -> {(video, index): CropBox}."""
    path, crops = Path(path), {}
    for number, line, fields in _records(path):
        clip = re.fullmatch(r"(.+)_(\d+)", _strip_ext(fields[0]))
        values = fields[1:]
        if clip is None or len(values) != 4 or not all(v.isdigit() for v in values):
            raise _error(path, number, line, "expected '<video>_<index>.mp4 x width y height'")
        x, width, y, height = map(int, values)
        if width == 0 or height == 0:
            raise _error(path, number, line, "crop width and height must be > 0")
        key = (clip[1], int(clip[2]))
        _unique(crops, key, path, number, line)
        crops[key] = CropBox(x, y, width, height)
    return crops


def read_resolutions(path: str | os.PathLike) -> dict[str, int]:
    """`<video>.mp4 <height>` lines -> {video: height}; 0 (seen in WRA) means unknown."""
    path, heights = Path(path), {}
    for number, line, fields in _records(path):
        if len(fields) != 2 or not fields[1].isdigit():
            raise _error(path, number, line, "expected '<video>.mp4 <frame height>'")
        video = _strip_ext(fields[0])
        _unique(heights, video, path, number, line)
        heights[video] = int(fields[1])
    return heights


def read_identity_list(path: str | os.PathLike) -> list[str]:
    """One identity per line; '#' starts a comment (e.g. data/hdtf/test_identities.txt)."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


# ----------------------------------------------------------------------------- planning


def find_subsets(annotation_dir: str | os.PathLike) -> dict[str, Path]:
    """{subset: folder} for every `<SUBSET>_annotion_time.txt` (or the HDTF_dataset/ inside)."""
    root = Path(annotation_dir)
    for folder in (root, root / "HDTF_dataset"):
        found = {}
        for pattern in ("*_annotion_time.txt", "*_annotation_time.txt"):
            for f in sorted(folder.glob(pattern)):
                found.setdefault(f.name.split("_", 1)[0], folder)
        if found:
            return dict(sorted(found.items()))
    return {}


def _subset_file(folder: Path, subset: str, kind: str) -> Path | None:
    names = [f"{subset}_{kind}.txt"]
    if kind == "annotion_time":
        names.append(f"{subset}_annotation_time.txt")
    return next((folder / n for n in names if (folder / n).is_file()), None)


def person_name(subset: str, video: str) -> str:
    """'AmyKlobuchar1' -> 'AmyKlobuchar' in WDA/WRA; RD names stay whole ('Radio11')."""
    if subset in PERSON_COUNTER_SUBSETS:
        return re.sub(r"\d+$", "", video) or video
    return video


def _youtube_id(url: str) -> str:
    # `&t=6s` and similar suffixes vary between two listings of one upload; the id does not.
    query = parse_qs(urlparse(url).query)
    return query["v"][0] if query.get("v") else url


def _raw_index(raw_dir: Path) -> dict[str, Path]:
    """Video files by stem in raw_dir and its subset subfolders ("WDA/AmyKlobuchar1")."""
    index: dict[str, Path] = {}

    def add(prefix: str, path: Path) -> None:
        # Hidden names are our own unfinished temporaries; yt-dlp's partial downloads end in
        # .part and its unmerged streams in .f137.mp4, so neither matches a video name.
        if path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith("."):
            # A BOM can reach a file name from WDA_video_url.txt's first line.
            index.setdefault(prefix + path.stem.lstrip("\ufeff"), path)

    if raw_dir.is_dir():
        for path in sorted(raw_dir.iterdir()):
            if path.is_dir():
                for inner in sorted(path.iterdir()):
                    add(f"{path.name}/", inner)
            else:
                add("", path)
    return index


def plan_clips(
    annotation_dir: str | os.PathLike,
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    require_crop: bool = False,
    identities: Collection[str] | None = None,
) -> list[HDTFClip]:
    """Every annotated clip, with its raw video (or None) and its output path.

    Raw videos are found as `raw/<SUBSET>/<video>.*`, `raw/<SUBSET>_<video>.*` or
    `raw/<video>.*` (mp4/mkv/webm/mov). `require_crop` drops clips HDTF gives no crop for;
    `identities` keeps only those people (a ValueError names any that HDTF does not have).
    """
    subsets = find_subsets(annotation_dir)
    if not subsets:
        raise AnnotationError(f"{annotation_dir}: no <SUBSET>_annotion_time.txt files found")
    raw, out = _raw_index(Path(raw_dir)), Path(out_dir)
    clips, first_by_upload = [], {}
    for subset, folder in subsets.items():
        times = read_annotation_times(_subset_file(folder, subset, "annotion_time"))
        files = {k: _subset_file(folder, subset, k) for k in ("crop_wh", "resolution", "video_url")}
        crops = read_crops(files["crop_wh"]) if files["crop_wh"] else {}
        heights = read_resolutions(files["resolution"]) if files["resolution"] else {}
        urls = read_video_urls(files["video_url"]) if files["video_url"] else {}
        for video in sorted(times):
            identity = f"{subset}_{person_name(subset, video)}"
            if video in urls:
                # WDA lists one upload twice (WhipJimClyburn, JamesClyburn1): give both the same
                # identity so a held-out person cannot reach training through the duplicate.
                identity = first_by_upload.setdefault(_youtube_id(urls[video]), identity)
            source = next(
                (raw[k] for k in (f"{subset}/{video}", f"{subset}_{video}", video) if k in raw),
                None,
            )
            for index, span in enumerate(times[video]):
                crop = crops.get((video, index))
                if require_crop and crop is None:
                    continue
                name = f"{subset}_{video}_{index:03d}"
                clips.append(
                    HDTFClip(
                        subset=subset,
                        video=video,
                        index=index,
                        identity=identity,
                        name=name,
                        source=source,
                        time=span,
                        crop=crop,
                        resolution=heights.get(video) or None,
                        output=out / identity / f"{name}.mp4",
                    )
                )
    if identities is not None:
        unknown = sorted(set(identities) - {c.identity for c in clips})
        if unknown:
            raise ValueError(f"identities not in the HDTF annotations: {', '.join(unknown)}")
        wanted = set(identities)
        clips = [c for c in clips if c.identity in wanted]
    return clips


# ----------------------------------------------------------------------------- cutting


def fit_crop(
    crop: CropBox, frame_width: int, frame_height: int, annotated_height: int | None = None
) -> CropBox:
    """The HDTF crop in the downloaded video's pixels: rescaled, kept inside, even-sized.

    The crops were measured on a frame `annotated_height` tall; a download at another height
    is scaled to match. A few resolution entries are wrong (crops 776–1134 px tall on "720"
    videos), so the rescale is trusted only when the box fits the annotated frame. A box that
    still overhangs the frame shrinks about its centre (aspect kept), and sizes round down to
    even numbers because H.264 4:2:0 needs them.
    """
    box = crop
    if annotated_height and annotated_height != frame_height:
        annotated_width = frame_width * annotated_height / frame_height
        if box.x + box.width <= annotated_width + 1 and box.y + box.height <= annotated_height + 1:
            s = frame_height / annotated_height
            box = CropBox(*(round(v * s) for v in (box.x, box.y, box.width, box.height)))
    shrink = min(1.0, frame_width / box.width, frame_height / box.height)
    width, height = int(box.width * shrink), int(box.height * shrink)
    width, height = max(2, width - width % 2), max(2, height - height % 2)
    centre_x, centre_y = box.x + box.width / 2, box.y + box.height / 2
    x = min(max(0, round(centre_x - width / 2)), frame_width - width)
    y = min(max(0, round(centre_y - height / 2)), frame_height - height)
    return CropBox(x, y, width, height)


def ffmpeg_exe() -> str:
    """The ffmpeg shipped with imageio-ffmpeg (IMAGEIO_FFMPEG_EXE overrides it)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _count_frames(path: Path) -> int:
    """Frames at `FPS` as data/preprocess.py will read them (video_io.FrameClock)."""
    try:
        return count_frames_at_fps(path, FPS)
    except MediaError:
        return 0


def cut_command(clip: HDTFClip, crop: CropBox, destination: Path, ffmpeg: str) -> list[str]:
    """ffmpeg arguments that cut `clip.time`, crop and encode H.264 + AAC.

    The source's frame timing passes through unchanged: resampling to 25 fps is left to the
    one reader every stage uses (video_io.iter_frames_at_fps), so that a clip here and the
    same video given to sample.py become the same frames. ffmpeg's `fps` filter rounds
    timestamps to the nearest output instant, a different rule (a frame more or less).
    """
    return [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        # -ss before -i seeks the input; while transcoding ffmpeg still decodes from the
        # previous keyframe and drops frames up to the start, so the cut is frame-accurate
        # and audio and video start at the same instant.
        "-ss", f"{clip.time.start:.3f}", "-i", str(clip.source), "-t", f"{clip.time.duration:.3f}",
        "-map", "0:v:0", "-map", "0:a:0",
        "-vf", f"crop={crop.width}:{crop.height}:{crop.x}:{crop.y}", "-fps_mode", "passthrough",
        "-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "192k",
        "-movflags", "+faststart", "-f", "mp4", str(destination),
    ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CutResult:
    name: str
    status: str  # "written" | "skipped" (the output already existed)
    duration: float | None = None  # seconds of video written


def cut_clip(clip: HDTFClip, *, ffmpeg: str | None = None, overwrite: bool = False) -> CutResult:
    """Writes `clip.output` atomically; an existing output is finished work and is skipped."""
    if clip.output.exists() and not overwrite:
        return CutResult(clip.name, "skipped")
    if clip.source is None:
        raise MediaError(f"{clip.name}: raw video {clip.subset}/{clip.video} not downloaded")
    info = probe_video(clip.source)
    width, height = info.width, info.height
    if not info.has_audio:
        # HDTF's own download.py fetches video only; this model needs the speech.
        raise MediaError(f"{clip.source}: no audio track (download video and audio)")
    crop = (
        fit_crop(clip.crop, width, height, clip.resolution)
        if clip.crop is not None
        else CropBox(0, 0, width - width % 2, height - height % 2)
    )
    with atomic_path(clip.output) as tmp:
        command = cut_command(clip, crop, tmp, ffmpeg or ffmpeg_exe())
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise MediaError(f"{clip.source}: ffmpeg failed for {clip.name}: {last}")
        frames = _count_frames(tmp)
        if frames == 0:
            raise MediaError(
                f"{clip.source}: no frames in {clip.time.start:.0f}-{clip.time.end:.0f} s "
                f"(is the video shorter than its annotation?)"
            )
    return CutResult(clip.name, "written", frames / FPS)


# ----------------------------------------------------------------------------- batch


@dataclasses.dataclass
class PrepareSummary:
    written: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # finished in an earlier run
    missing_raw: list[str] = dataclasses.field(default_factory=list)  # "WDA/AmyKlobuchar1"
    missing_clips: int = 0  # clips not attempted because their raw video is missing
    short: list[str] = dataclasses.field(default_factory=list)  # written, but cut short
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # clip -> one-line error

    @property
    def available(self) -> int:
        return len(self.written) + len(self.skipped)


def prepare_clips(
    clips: Iterable[HDTFClip],
    *,
    workers: int = 1,
    progress: bool = True,
    ffmpeg: str | None = None,
) -> PrepareSummary:
    """Cuts every clip whose raw video exists; never raises for one bad clip."""
    from tqdm import tqdm

    summary, todo = PrepareSummary(), []
    for clip in clips:
        if clip.source is None and not clip.output.exists():
            key = f"{clip.subset}/{clip.video}"
            if key not in summary.missing_raw:
                summary.missing_raw.append(key)
            summary.missing_clips += 1
        else:
            todo.append(clip)
    exe = ffmpeg or ffmpeg_exe()
    # Threads are enough: each worker waits on its own ffmpeg process.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(cut_clip, clip, ffmpeg=exe): clip for clip in todo}
        done = concurrent.futures.as_completed(futures)
        for future in tqdm(done, total=len(futures), desc="HDTF clips", disable=not progress):
            clip = futures[future]
            try:
                result = future.result()
            except (MediaError, OSError) as e:
                summary.failed[clip.name] = str(e).splitlines()[0]
                continue
            if result.status == "skipped":
                summary.skipped.append(clip.name)
                continue
            summary.written.append(clip.name)
            if result.duration is not None and (
                result.duration < clip.time.duration - SHORT_TOLERANCE_S
            ):
                summary.short.append(clip.name)
    for names in (summary.written, summary.skipped, summary.short, summary.missing_raw):
        names.sort()
    return summary
