"""Preview of a synthetic dataset: a contact sheet and an annotated video with its audio.

    python -m dithead_jax.synthetic.preview --dataset DIR --out demo/

contact_sheet.png: one row per identity (held-out ones marked), frames spread over its
first clip, with the viseme sounding at each frame. preview.mp4: the first clip of each
identity side by side, with the iBUG-68 landmarks drawn in, and the first identity's speech.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dithead_jax.cli import check_writable_dir, fail
from dithead_jax.data.video_io import MediaError, atomic_path, read_video, write_video
from dithead_jax.synthetic.speech import Viseme

LANDMARK_COLOURS = {
    range(0, 17): (255, 255, 0),
    range(17, 48): (0, 255, 255),
    range(48, 68): (255, 0, 255),
}


def draw_landmarks(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    r = max(1.0, frame.shape[0] / 200)
    for idx, (x, y) in enumerate(landmarks):
        colour = next(c for span, c in LANDMARK_COLOURS.items() if idx in span)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return np.asarray(img)


def contact_sheet(dataset: Path, index: dict, columns: int = 8) -> Image.Image:
    rows = []
    for identity, meta in index["identities"].items():
        clip = next(c for c in index["clips"] if c["identity"] == identity)
        media = read_video(dataset / clip["video"])
        ann = np.load(dataset / clip["annotations"])
        picks = np.linspace(0, len(media.frames) - 1, columns).round().astype(int)
        tiles = []
        for t in picks:
            tile = Image.fromarray(media.frames[t])
            label = f"{identity}{' (test)' if meta['split'] == 'test' else ''} t={t}: "
            label += Viseme(int(ann["viseme"][t])).name.lower()
            ImageDraw.Draw(tile).text((4, 4), label, fill=(255, 255, 255))
            tiles.append(np.asarray(tile))
        rows.append(np.concatenate(tiles, 1))
    return Image.fromarray(np.concatenate(rows, 0))


def preview_video(dataset: Path, index: dict, out: Path) -> None:
    firsts = [next(c for c in index["clips"] if c["identity"] == i) for i in index["identities"]]
    clips = [read_video(dataset / c["video"]) for c in firsts]
    annotations = [np.load(dataset / c["annotations"])["landmarks"] for c in firsts]
    length = min(len(c.frames) for c in clips)
    frames = np.stack(
        [
            np.concatenate(
                [
                    draw_landmarks(c.frames[t], a[t])
                    for c, a in zip(clips, annotations, strict=True)
                ],
                1,
            )
            for t in range(length)
        ]
    )
    write_video(out, frames, int(round(clips[0].fps)), clips[0].audio, clips[0].sample_rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Preview a synthetic talking-face dataset.")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    prog = "preview"
    dataset = Path(args.dataset)
    index_path = dataset / "index.json"
    if not index_path.is_file():
        fail(prog, f"{index_path}: not found (run data/synthetic.py first)")
    out = check_writable_dir(prog, args.out)
    index = json.loads(index_path.read_text())
    try:
        with atomic_path(out / "contact_sheet.png") as tmp:
            contact_sheet(dataset, index).save(tmp, format="PNG")
        preview_video(dataset, index, out / "preview.mp4")
    except (MediaError, OSError) as e:
        fail(prog, str(e), code=1)
    print(f"wrote {out / 'contact_sheet.png'} and {out / 'preview.mp4'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
