"""Per-frame training records on disk: TFDS ArrayRecord datasets written and read without TF.

Two record kinds (`DatasetWriter(kind=...)`); S = image size, W = audio window, D = audio
feature dim, (h, w, c) = latent shape, K = masked-latent variants:

| stage1 (VQGANs, preprocessing output) | stage2 (DiT, written by the latent precompute) |
| --- | --- |
| `frame` Image (S, S, 3) uint8 | `latent` float16 (h, w, c), pre-quantisation |
| `masked_frame` Image (S, S, 3) uint8 | `masked_latents` float16 (K, h, w, c) |
| `mask` uint8 (S, S) = alpha x 255, zlib | `mask` uint8 (h, w): the same, area-averaged |
| `landmarks` float32 (68, 2), crop pixels | |
| `crop_box` float32 (4,) x0 y0 x1 y1, source pixels | |
| `source_size` int32 (2,) source H, W | |
| `audio` float32 (W, D) | `audio` float32 (W, D) |
| | `mask_shifts` float32 (K, 2), (dx, dy) pixels: with `mask_shifts=True` |
| | `landmarks` float32 (n, 2) DiffTalk's / image size: with `num_landmarks=n` |
| `identity`, `video_id` Text (read back as bytes); `frame_index`, `num_frames` int32 | same |

Layout of `out_dir`:

    writer.json                       kind + shape parameters; every writer must agree
    videos/<video_id>.array_record    one self-contained shard per video, frames in order
    videos/<video_id>.json            sidecar (split, identity, frame indices, bytes); written
                                      LAST, so its presence is the "video finished" marker
    dataset/                          TFDS dir built by finalize(): dataset_info.json,
                                      features.json, metadata.json, hard links named
                                      dithead_<kind>-<split>.array_record-00000-of-000NN
                                      (videos sorted by id), video_index-<split>.npz

`video_index-<split>.npz` gives, per video in shard order, `video_id`, `identity`, `start`
(first record's position in the split) and `length`, and per record `frame_index`: the
stage-2 pipeline finds a target's video and its reference frame from it without reading.

Writing is resumable and parallel: any number of processes or hosts (on one shared POSIX
file system) write disjoint videos; every file goes to a temp name and is renamed into place;
`has_video` lets a re-run skip finished videos; stray temp files (leading '.') are ignored.
One process calls `finalize()` after all writers are done (it rebuilds `dataset/` from every
finished video, so it can run again after more videos arrive).

Image compression, per 256x256 RGB image (this noisy 2-core machine, PIL 13, no OpenCV;
"natural" = skimage photos astronaut/chelsea/coffee, "synthetic" = frames decoded from a
`data/synthetic.py` mp4):

| encoding | natural KiB | synthetic KiB | decode ms | PSNR dB (nat / syn) |
| --- | --- | --- | --- | --- |
| PNG level 1 | 120 | 40 | 8-10 | lossless |
| PNG level 6 | 112 | 32 | 6-9 | lossless |
| JPEG q95 4:2:0 | 29 | 11 | 1.8-2.1 | 38.2 / 41.0 |
| JPEG q95 4:4:4 (default) | 38 | 14 | 2.0-2.3 | 41.4 / 46.8 |

Default: JPEG q95 without chroma subsampling (4:2:0 blurs the red lip edges). It is 3x
smaller and 3-4x faster to decode than PNG; its error (> 41 dB PSNR) is of the order of what
the H.264 source already lost and far below a VQGAN f4's own reconstruction error (LDM's
vq-f4: ~27 dB). `image_encoding="png"` keeps frames exact.

Whole stage-1 records at 256^2 (frame + masked frame + ~5 KiB zlib mask + 1.4 KiB audio +
landmarks), measured, with the cost of one hour of 25 fps video (90,000 frames) and the time
to read + decode one record through `open_dataset` (all fields / frame only):

| encoding | natural-ish photos | synthetic faces | read ms (nat / syn) |
| --- | --- | --- | --- |
| JPEG q95 | 82 KiB = 7.0 GiB/hour | 38 KiB = 3.3 GiB/hour | 8.4 / 3.1; frame only 4.5 / 2.6 |
| PNG | 241 KiB = 20.7 GiB/hour | 92 KiB = 7.9 GiB/hour | 24 / 13; frame only 14 / 7 |

Real face crops (smooth skin, blurred background) should fall between the two columns: HDTF
(~16 h) is ~50-110 GiB as JPEG. Stage-2 at 64x64x3, K=1, Gaussian float16 latents
(bench/mask_shift.py, 2026-12): 48 KiB per frame after zstd (4.1 GiB/hour), +22 KiB per extra
masked variant (62 / +28 KiB before float16 was stored as raw bytes). Stage-1 shards are
uncompressed (JPEG bytes do not compress; zstd would only cost read time), stage-2 zstd.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image
from tensorflow_datasets.core import example_serializer, naming
from tensorflow_datasets.core import splits as splits_lib

from dithead_jax.data.video_io import atomic_path

Kind = Literal["stage1", "stage2"]
NUM_LANDMARKS = 68
DATASET_SUBDIR = "dataset"
VIDEOS_SUBDIR = "videos"
VERSION = "1.0.0"
# group_size:1 = one record per chunk, i.e. true random access (what TFDS itself writes).
_SHARD_OPTIONS = {"stage1": "group_size:1,uncompressed", "stage2": "group_size:1,zstd:3"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
_SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Record keys the caller supplies (the writer adds identity, video_id and num_frames).
_STAGE1_KEYS = ("frame", "masked_frame", "mask", "landmarks", "crop_box", "source_size", "audio")
_STAGE2_KEYS = ("latent", "masked_latents", "mask", "audio")
_STAGE2_OPTIONAL = ("mask_shifts", "landmarks")


def valid_id(video_id: str) -> bool:
    """Whether `video_id` can name a shard (ASCII letters, digits and `._+=-`)."""
    return bool(_ID_RE.match(video_id))


def dataset_name(kind: Kind) -> str:
    return f"dithead_{kind}"


def make_features(
    kind: Kind,
    *,
    image_size: int | None = None,
    audio_window: int = 11,
    audio_dim: int = 33,
    image_encoding: Literal["jpeg", "png"] = "jpeg",
    latent_shape: Sequence[int] | None = None,
    num_masked: int = 1,
    mask_shifts: bool = False,
    num_landmarks: int = 0,
    latent_bytes: bool = True,
) -> tfds.features.FeaturesDict:
    """The TFDS feature spec of one record (see the module docstring)."""
    common = {
        "audio": tfds.features.Tensor(shape=(audio_window, audio_dim), dtype=np.float32),
        "identity": tfds.features.Text(),
        "video_id": tfds.features.Text(),
        "frame_index": tfds.features.Scalar(dtype=np.int32),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
    }
    if kind == "stage1":
        if not image_size:
            raise ValueError("stage1 records need image_size")
        s = int(image_size)
        image = dict(shape=(s, s, 3), encoding_format=image_encoding)
        return tfds.features.FeaturesDict(
            {
                "frame": tfds.features.Image(**image),
                "masked_frame": tfds.features.Image(**image),
                # The mask is smooth and mostly 0/255: zlib makes it ~2% of raw and stays exact.
                "mask": tfds.features.Tensor(
                    shape=(s, s), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                ),
                "landmarks": tfds.features.Tensor(shape=(NUM_LANDMARKS, 2), dtype=np.float32),
                "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "source_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                **common,
            }
        )
    if kind == "stage2":
        if latent_shape is None or len(latent_shape) != 3:
            raise ValueError("stage2 records need latent_shape=(h, w, c)")
        if num_masked < 1:
            raise ValueError(f"num_masked must be >= 1, got {num_masked}")
        shape = tuple(int(x) for x in latent_shape)
        optional = {}
        for key, n in (("mask_shifts", num_masked if mask_shifts else 0),
                       ("landmarks", num_landmarks)):  # fmt: skip
            if n:
                optional[key] = tfds.features.Tensor(shape=(int(n), 2), dtype=np.float32)
        # Raw bytes: tf.train.Example has no float16 list and would store them as float32
        # (measured: 28 instead of 22 KiB per 64x64x3 latent after zstd).
        encoding = tfds.features.Encoding.BYTES if latent_bytes else tfds.features.Encoding.NONE
        half = dict(dtype=np.float16, encoding=encoding)
        return tfds.features.FeaturesDict(
            {
                **optional,
                "latent": tfds.features.Tensor(shape=shape, **half),
                "masked_latents": tfds.features.Tensor(shape=(int(num_masked), *shape), **half),
                # The lower-face mask at latent resolution: where the DiT's loss may weigh more.
                "mask": tfds.features.Tensor(
                    shape=shape[:2], dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                ),
                **common,
            }
        )
    raise ValueError(f"kind must be 'stage1' or 'stage2', got {kind!r}")


def encode_image(image: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """uint8 (S, S, 3) -> PNG or JPEG bytes (PIL; tfds' own encoder needs TensorFlow)."""
    buf = io.BytesIO()
    if encoding == "png":
        # Level 1: ~7% larger than the default level 6 but 2-3x faster to write.
        Image.fromarray(image).save(buf, format="png", compress_level=1)
    elif encoding == "jpeg":
        Image.fromarray(image).save(buf, format="jpeg", quality=jpeg_quality, subsampling=0)
    else:
        raise ValueError(f"image encoding must be 'jpeg' or 'png', got {encoding!r}")
    return buf.getvalue()


def _write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1))


class VideoShardWriter:
    """Streams one video's records into its shard; see `DatasetWriter.video_writer`."""

    def __init__(
        self, owner: DatasetWriter, split: str, video_id: str, identity: str, n: int, source: str
    ):
        self._owner, self._split, self._video_id = owner, split, video_id
        self._identity, self._num_frames, self._source = identity, n, source
        self._frame_index: list[int] = []
        self._writer: Any = None
        self._tmp = ""

    def write(self, records: Mapping[str, Any]) -> None:
        """Appends a chunk: each required key stacked over T' frames (see module docstring).

        `frame_index` (T',) is optional and defaults to continuing 0, 1, 2, ...
        """
        chunk = self._owner._check_chunk(records)
        t = len(chunk["audio"])
        start = len(self._frame_index)
        frame_index = np.asarray(records.get("frame_index", np.arange(start, start + t)))
        if frame_index.shape != (t,):
            raise ValueError(f"frame_index must have shape ({t},), got {frame_index.shape}")
        self._frame_index.extend(int(i) for i in frame_index)
        if len(self._frame_index) > self._num_frames:
            raise ValueError(f"{self._video_id}: more than num_frames={self._num_frames} records")
        for i in range(t):
            example = {k: chunk[k][i] for k in chunk}
            example |= {
                "identity": self._identity,
                "video_id": self._video_id,
                "frame_index": int(frame_index[i]),
                "num_frames": self._num_frames,
            }
            self._writer.write(self._owner._serialize(example))

    def _open(self, shard: Path) -> None:
        fd, self._tmp = tempfile.mkstemp(prefix=f".{shard.name}.", suffix=".tmp", dir=shard.parent)
        os.close(fd)
        self._writer = array_record_module.ArrayRecordWriter(
            self._tmp, _SHARD_OPTIONS[self._owner.kind]
        )

    def _commit(self, shard: Path) -> None:
        self._writer.close()
        fi = np.asarray(self._frame_index, np.int64)
        if len(fi) != self._num_frames:
            raise ValueError(f"{self._video_id}: wrote {len(fi)} of {self._num_frames} frames")
        if len(fi) > 1 and np.any(np.diff(fi) <= 0):
            raise ValueError(f"{self._video_id}: frame_index must be strictly increasing")
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, shard)
        sidecar = {
            "video_id": self._video_id,
            "split": self._split,
            "identity": self._identity,
            "source": self._source,
            "num_records": len(fi),
            "num_bytes": shard.stat().st_size,
            "frame_index": fi.tolist(),
        }
        _write_json(shard.with_suffix(".json"), sidecar)

    def _abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


class DatasetWriter:
    """Writes per-video shards into `out_dir` and assembles them into a TFDS dataset.

    stage1: `DatasetWriter(out, "stage1", image_size=256, audio_window=11, audio_dim=33)`;
    stage2: `DatasetWriter(out, "stage2", latent_shape=(64, 64, 3), num_masked=K, ...)`.
    Re-opening an existing `out_dir` with different parameters is an error (the records of
    one dataset must share a feature spec).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        kind: Kind,
        *,
        image_size: int | None = None,
        audio_window: int = 11,
        audio_dim: int = 33,
        image_encoding: Literal["jpeg", "png"] = "jpeg",
        jpeg_quality: int = 95,
        latent_shape: Sequence[int] | None = None,
        num_masked: int = 1,
        mask_shifts: bool = False,
        num_landmarks: int = 0,
        provenance: Mapping[str, Any] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.kind = kind
        params: dict[str, Any] = {"kind": kind, "audio_window": audio_window}
        params["audio_dim"] = audio_dim
        if kind == "stage1":
            params |= dict(image_size=image_size, image_encoding=image_encoding)
            params["jpeg_quality"] = jpeg_quality
        else:
            params |= dict(latent_shape=list(latent_shape or ()), num_masked=num_masked)
            # Older writers stored float16 as float32 lists and have no `latent_bytes` in
            # writer.json: re-opening such a folder fails here, never finalizes a mixture.
            params["latent_bytes"] = True
            if mask_shifts:
                params["mask_shifts"] = True
            if num_landmarks:
                params["num_landmarks"] = int(num_landmarks)
        self.features = make_features(**{k: v for k, v in params.items() if k != "jpeg_quality"})
        if provenance:
            # What made these records (e.g. the VQGAN runs and latent statistics of a stage-2
            # set); stored with the dataset, and like the shapes it must match on re-open.
            params["provenance"] = json.loads(json.dumps(dict(provenance)))
        self.params = params
        self._serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())
        self.videos_dir.mkdir(parents=True, exist_ok=True)
        config = self.out_dir / "writer.json"
        if not config.exists():
            _write_json(config, params)  # racing hosts write the same bytes; last one wins
        existing = json.loads(config.read_text())
        if existing != params:
            raise ValueError(f"{config} has {existing}, this writer was given {params}")

    @property
    def videos_dir(self) -> Path:
        return self.out_dir / VIDEOS_SUBDIR

    @property
    def dataset_dir(self) -> Path:
        return self.out_dir / DATASET_SUBDIR

    def _shard(self, video_id: str) -> Path:
        if not _ID_RE.match(video_id):
            raise ValueError(f"video_id {video_id!r} must match {_ID_RE.pattern}")
        return self.videos_dir / f"{video_id}.array_record"

    def has_video(self, video_id: str) -> bool:
        """True once `video_id` is completely written (by any process, any split)."""
        return self._shard(video_id).with_suffix(".json").exists()

    def finished_videos(self) -> list[dict[str, Any]]:
        """Sidecars of every finished video, sorted by video_id."""
        out = []
        for p in sorted(self.videos_dir.glob("*.json")):
            if p.name.startswith("."):
                continue
            meta = json.loads(p.read_text())
            if (self.videos_dir / f"{meta['video_id']}.array_record").exists():
                out.append(meta)
        return out

    def _check_chunk(self, records: Mapping[str, Any]) -> dict[str, np.ndarray]:
        keys = _STAGE1_KEYS if self.kind == "stage1" else _STAGE2_KEYS
        if self.kind == "stage2":
            keys += tuple(k for k in _STAGE2_OPTIONAL if k in self.features)
        missing = [k for k in keys if k not in records]
        if missing:
            raise ValueError(f"{self.kind} records lack {missing}")
        chunk = {k: np.asarray(records[k]) for k in keys}
        if self.kind == "stage1" and chunk["mask"].dtype != np.uint8:
            # Accept alpha in [0, 1]; stored as round(alpha * 255).
            chunk["mask"] = np.clip(np.round(chunk["mask"] * 255.0), 0, 255).astype(np.uint8)
        lengths = {k: len(v) for k, v in chunk.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"records disagree on the number of frames: {lengths}")
        specs = self.features.get_tensor_info()
        for k, v in chunk.items():
            spec = specs[k]
            if k in ("frame", "masked_frame"):
                if v.dtype != np.uint8 or v.shape[1:] != spec.shape:
                    raise ValueError(f"{k}: want uint8 (T, *{spec.shape}), got {v.dtype} {v.shape}")
            elif v.shape[1:] != spec.shape:
                raise ValueError(f"{k}: want (T, *{spec.shape}), got {v.shape}")
            else:
                # Encoders hand over float32/64 latents and int64 sizes: store the spec dtype.
                same_kind = np.issubdtype(v.dtype, np.floating) == np.issubdtype(
                    spec.np_dtype, np.floating
                )
                if not same_kind:
                    raise ValueError(f"{k}: want {spec.np_dtype}, got {v.dtype}")
                chunk[k] = v.astype(spec.np_dtype, copy=False)
        return chunk

    def _serialize(self, example: dict[str, Any]) -> bytes:
        if self.kind == "stage1":
            enc, q = self.params["image_encoding"], self.params["jpeg_quality"]
            example["frame"] = encode_image(example["frame"], enc, q)
            example["masked_frame"] = encode_image(example["masked_frame"], enc, q)
        return self._serializer.serialize_example(self.features.encode_example(example))

    @contextlib.contextmanager
    def video_writer(
        self, split: str, video_id: str, *, identity: str, num_frames: int, source: str = ""
    ) -> Iterator[VideoShardWriter]:
        """Streams a long video in chunks: `with w.video_writer(...) as v: v.write(chunk)`.

        `source` is the video's original name when `video_id` had to be made safe (any
        text; default: `video_id`); the sidecar and the video index keep it.

        The video is committed on a clean exit once exactly `num_frames` records were
        written; on an exception nothing of it remains.
        """
        if not _SPLIT_RE.match(split):
            raise ValueError(f"split {split!r} must match {_SPLIT_RE.pattern}")
        if num_frames < 1:
            raise ValueError(f"{video_id}: a video needs at least one frame")
        shard = self._shard(video_id)
        # Un-finish first: a crash while rewriting must not leave the old marker behind.
        shard.with_suffix(".json").unlink(missing_ok=True)
        source = source or video_id
        v = VideoShardWriter(self, split, video_id, str(identity), int(num_frames), source)
        v._open(shard)
        committed = False
        try:
            yield v
            v._commit(shard)
            committed = True
        finally:
            if not committed:
                v._abort()

    def write_video(
        self,
        split: str,
        video_id: str,
        records: Mapping[str, Any],
        *,
        identity: str | None = None,
    ) -> int:
        """Writes one whole video (all keys stacked over its T frames); returns T.

        `identity` may be given here or as `records["identity"]` (a string). `frame_index`
        (T,) is optional (default 0..T-1); `num_frames` is always T.
        """
        if identity is None:
            identity = records.get("identity")
            if identity is None:
                raise ValueError(f"{video_id}: no identity given")
            identity = str(np.asarray(identity).reshape(-1)[0])
        chunk: dict[str, Any] = self._check_chunk(records)
        if "frame_index" in records:
            chunk["frame_index"] = records["frame_index"]
        t = len(chunk["audio"])
        with self.video_writer(split, video_id, identity=identity, num_frames=t) as v:
            v.write(chunk)
        return t

    def finalize(self) -> Path:
        """Builds `out_dir/dataset/` from every finished video; returns its path.

        Shards are hard-linked (copied only where the file system has no hard links). The
        new directory is assembled beside the old one and swapped in by two renames, so a
        crash leaves either the old or the new dataset, never a mixture.
        """
        videos = self.finished_videos()
        if not videos:
            raise ValueError(f"no finished videos in {self.videos_dir}")
        name = dataset_name(self.kind)
        tmp = Path(tempfile.mkdtemp(prefix=".dataset.", dir=self.out_dir))
        try:
            split_infos = []
            for split in sorted({v["split"] for v in videos}):
                members = [v for v in videos if v["split"] == split]
                split_infos.append(self._assemble_split(tmp, name, split, members))
            info = tfds.core.DatasetInfo(
                builder=tfds.core.DatasetIdentity(
                    name=name,
                    version=VERSION,
                    data_dir=str(self.dataset_dir),
                    module_name=__name__,
                ),
                description=f"DiT-Head {self.kind} per-frame records (dithead_jax).",
                features=self.features,
                metadata=tfds.core.MetadataDict(self.params),
            )
            info.set_file_format("array_record")
            info.set_splits(splits_lib.SplitDict(split_infos))
            info.write_to_directory(tmp)
            old = self.out_dir / f".dataset.old.{os.getpid()}"
            if self.dataset_dir.exists():
                os.replace(self.dataset_dir, old)
            os.replace(tmp, self.dataset_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.dataset_dir

    def _assemble_split(
        self, out: Path, name: str, split: str, videos: list[dict[str, Any]]
    ) -> splits_lib.SplitInfo:
        template = naming.ShardedFileTemplate(
            data_dir=out, dataset_name=name, split=split, filetype_suffix="array_record"
        )
        n = len(videos)
        lengths = []
        for i, v in enumerate(videos):
            src = self.videos_dir / f"{v['video_id']}.array_record"
            if src.stat().st_size != v["num_bytes"]:
                raise ValueError(f"{src} changed after its sidecar was written; rewrite it")
            dst = template.sharded_filepath(shard_index=i, num_shards=n)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            lengths.append(v["num_records"])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        np.savez(
            out / f"video_index-{split}.npz",
            video_id=np.array([v["video_id"] for v in videos]),
            identity=np.array([v["identity"] for v in videos]),
            source=np.array([v.get("source", v["video_id"]) for v in videos]),
            start=starts,
            length=np.asarray(lengths, np.int64),
            frame_index=np.concatenate([np.asarray(v["frame_index"], np.int32) for v in videos]),
        )
        return splits_lib.SplitInfo(
            name=split,
            shard_lengths=lengths,
            num_bytes=sum(v["num_bytes"] for v in videos),
            filename_template=template,
        )


# ---------------------------------------------------------------------------------------
# Readers


def dataset_path(path: str | os.PathLike) -> Path:
    """Accepts the writer's out_dir or its dataset/ subdirectory."""
    path = Path(path)
    if not (path / "dataset_info.json").exists() and (path / DATASET_SUBDIR).is_dir():
        path = path / DATASET_SUBDIR
    return path


def open_dataset(
    path: str | os.PathLike, split: str, *, skip_decoding: Sequence[str] = ()
) -> tuple[Sequence[dict[str, Any]], tfds.features.FeaturesDict]:
    """Random-access records of `split` as numpy dicts, and the feature spec.

    `path` is the dataset directory (or the writer's out_dir). Keys in `skip_decoding` come
    back as their stored bytes (e.g. the image a stage-1 pipeline does not use), which
    saves the decode. Text features come back as `bytes`. The source is picklable (Grain
    worker processes re-open it).
    """
    directory = dataset_path(path)
    if not (directory / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{path}: not a dataset (no dataset_info.json)")
    builder = tfds.builder_from_directory(os.fspath(directory))
    decoders = {k: tfds.decode.SkipDecoding() for k in skip_decoding}
    source = builder.as_data_source(split, decoders=decoders or None)
    return source, builder.info.features


def dataset_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The writer parameters (kind, shapes, encoding, provenance) stored with the dataset."""
    return json.loads((dataset_path(path) / "metadata.json").read_text())


_KIND_WORDS = {
    "stage1": "a stage-1 dataset (face crops from data/preprocess.py)",
    "stage2": "a stage-2 dataset (VQGAN latents from data/encode_latents.py)",
}


def require_kind(path: str | os.PathLike, kind: Kind, user: str) -> None:
    """Fails with one line when `path` holds the other kind of records than `user` reads,
    before a pipeline dies on a missing key deep inside Grain."""
    directory = dataset_path(path)
    meta_file = directory / "metadata.json"
    if not meta_file.is_file():
        return  # open_dataset names a missing dataset; older datasets lack only this file
    found = json.loads(meta_file.read_text()).get("kind")
    if found == kind or found not in _KIND_WORDS:
        return
    if kind == "stage2":
        fix = "encode it with data/encode_latents.py and pass that output instead"
    else:
        fix = "pass the stage-1 dataset the latents were encoded from"
    raise ValueError(f"{path}: {_KIND_WORDS[found]}, but {user} needs {_KIND_WORDS[kind]}; {fix}")


def load_video_index(path: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """Per video (shard order): video_id, identity, start, length; per record: frame_index."""
    with np.load(dataset_path(path) / f"video_index-{split}.npz") as z:
        return {k: z[k] for k in z.files}
