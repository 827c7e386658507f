"""The evaluation report: report.json and report.md with the paper's Table 1 alongside.

Every metric is either a number or "unavailable" with the reason (usually the weight file it
looked for); a missing network never turns into a made-up number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dithead_jax.data.video_io import atomic_path

# DiT-Head (Mir, Alonso & Mondragon, ICAART 2024), Table 1: 11 held-out HDTF identities,
# ground-truth driving audio, "padded face-crop videos" of each method. DiT-Head's row is
# "DiT-Head w/o Stage 3" (frame by frame, 25 fps: what we generate).
PAPER_TABLE = {
    "DiT-Head": {"psnr": 28.37, "ssim": 0.872, "lpips": 0.0856, "fid": 10.31, "lse_c": 3.60,
                 "lse_d": 10.49},
    "Wav2Lip": {"psnr": 27.09, "ssim": 0.847, "lpips": 0.104, "fid": 15.37, "lse_c": 10.78,
                "lse_d": 5.32},
    "MakeItTalk": {"psnr": 22.47, "ssim": 0.73, "lpips": 0.207, "fid": 55.20, "lse_c": 3.40,
                   "lse_d": 11.4},
}  # fmt: skip
PAPER_SOURCE = (
    "DiT-Head (Mir, Alonso & Mondragon, ICAART 2024), Table 1: 11 held-out HDTF identities, "
    "padded face-crop videos of each method; DiT-Head is its 'w/o Stage 3' row"
)
METRICS = ("psnr", "ssim", "lpips", "fid", "lse_c", "lse_d")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fid": False, "lse_c": True,
                    "lse_d": False}  # fmt: skip


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Writes report.json and report.md. `report` keys:

    metrics: {name: value or None} of the raw crops; metrics_composited (optional): the same
    for the composited frames, the paper's protocol (the main table when present);
    unavailable: {name: reason}; clips: [per-clip dicts];
    sync (optional): {"correlation", "control_correlation", "expert_calibration"};
    round_trip (optional): the frame VQGAN's round trips scored like the generated frames;
    modes (optional): per reference-mode summaries, keyed "MODE" or, at guidance scales
    other than 1, "MODE w=W"; settings: how it was generated.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=float))

    metrics, unavailable = report.get("metrics", {}), report.get("unavailable", {})
    lines = ["# Evaluation report", ""]
    settings = report.get("settings", {})
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()), ""]
    composited = report.get("metrics_composited")
    runs = [("composited (paper protocol)", composited)] if composited is not None else []
    runs.append(("raw crops" if composited is not None else "this run", metrics))
    header = ["", *(name for name, _ in runs), *(f"{n} (paper, HDTF)" for n in PAPER_TABLE)]
    rows = [
        [
            f"{m.upper().replace('_', '-')} {'↑' if HIGHER_IS_BETTER[m] else '↓'}",
            *(values.get(m) for _, values in runs),
            *(paper[m] for paper in PAPER_TABLE.values()),
        ]
        for m in METRICS
    ]
    lines += ["## Metrics", "", markdown_table(header, rows), ""]
    if composited is not None:
        lines += [
            "Composited (the main table, the paper's protocol): "
            f"{settings.get('composited', 'the generated faces composited')}. "
            "Raw crops: the decoded crops before paste-back.",
            "",
        ]
    lines += [
        f"Paper columns: {PAPER_SOURCE}. For reference only: a synthetic set or another "
        "split is not comparable number for number.",
        "",
    ]
    if unavailable:
        lines += ["Unavailable metrics:", ""]
        lines += [
            f"- {name.upper()}: {' '.join(str(reason).split())}"
            for name, reason in unavailable.items()
        ]
        lines.append("")
    sync = report.get("sync")
    if sync:
        lines += [
            "## Mouth sync (synthetic ground truth)",
            "",
            markdown_table(
                ["measure", "value"],
                [
                    ["correlation: measured vs true opening", sync.get("correlation")],
                    [
                        "control: generated from shuffled audio, vs true opening",
                        sync.get("control_correlation"),
                    ],
                    [
                        "expert on real held-out frames (calibration)",
                        sync.get("expert_calibration"),
                    ],
                    [
                        "expert on VQGAN round-trips (the decoder's ceiling)",
                        sync.get("vqgan_ceiling"),
                    ],
                ],
            ),
            "",
        ]
    round_trip, first_mode = report.get("round_trip"), dict(report.get("metrics", {}))
    first_mode |= {f"composited_{k}": v for k, v in (composited or {}).items()}
    if round_trip:
        keys = list(round_trip)
        lines += [
            "## Where the face is lost: the frame VQGAN's round trip vs generated",
            "",
            "Lower face: the generated (or round-tripped) crop composited into the real one "
            "with the mask, as the dubbed video shows it; PSNR inside the mask, LPIPS on the "
            "crop's lower half.",
            "",
            markdown_table(
                ["", *keys],
                [
                    ["VQGAN round trip of the real frames", *round_trip.values()],
                    ["generated (first mode)", *(first_mode.get(k) for k in keys)],
                ],
            ),
            "",
        ]
    modes = report.get("modes")
    if modes:
        header = ["reference mode", *next(iter(modes.values())).keys()]
        lines += [
            "## Reference modes",
            "",
            markdown_table(header, [[k, *v.values()] for k, v in modes.items()]),
            "",
        ]  # noqa: E501
    clips = report.get("clips", [])
    if clips:
        keys = [k for k in clips[0] if k != "video"]
        lines += [
            "## Clips",
            "",
            markdown_table(["video", *keys], [[c["video"], *(c[k] for k in keys)] for c in clips]),
            "",
        ]  # noqa: E501
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines))
    return json_path, md_path
