"""Synthetic talking faces: identities, articulation -> iBUG-68 geometry -> anti-aliased frames.

Every drawn feature is a dense curve evaluated from the same parametric formula as its
landmarks, so the 68 points lie exactly on the rendered outlines (eyes on the eyes, inner
lips on the mouth opening). Geometry lives in a head-centred frame measured in image sizes
(x right, y down, origin near the nose); a per-frame similarity transform (translation,
roll, scale) plus a small yaw parallax moves it like a filmed head. Frames are drawn with
PIL at 2x and box-filtered down, which anti-aliases edges cheaply.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dithead_jax.synthetic.speech import Segment, Viseme, Voice

SUPERSAMPLE = 2

# Mouth articulation per viseme: inner-lip gap, width factor, rounding, teeth shown,
# lower lip tucked under the upper teeth, lips pressed. Gap is in head-frame units (image sizes).
ARTICULATION_KEYS = ("open", "width", "round", "teeth", "tuck", "press")
VISEME_ARTICULATION = {
    Viseme.SILENCE: (0.002, 1.00, 0.0, 0.0, 0.0, 0.0),
    Viseme.CLOSED: (0.000, 0.94, 0.0, 0.0, 0.0, 1.0),
    Viseme.OPEN: (0.075, 1.06, 0.1, 0.6, 0.0, 0.0),
    Viseme.ROUNDED: (0.048, 0.66, 1.0, 0.0, 0.0, 0.0),
    Viseme.SPREAD: (0.026, 1.18, 0.0, 1.0, 0.0, 0.0),
    Viseme.LIP_TEETH: (0.012, 1.00, 0.0, 1.0, 1.0, 0.0),
    Viseme.DENTAL: (0.020, 1.06, 0.0, 0.8, 0.0, 0.0),
}
# Vowel-specific refinements of the viseme targets (o is rounder and more open than u...).
PHONEME_ARTICULATION = {
    "u": (0.030, 0.58, 1.0, 0.0, 0.0, 0.0),
    "w": (0.022, 0.60, 1.0, 0.0, 0.0, 0.0),
    "i": (0.020, 1.22, 0.0, 1.0, 0.0, 0.0),
}

SKIN_TONES = np.array(
    [
        [255, 224, 196], [241, 194, 160], [224, 172, 128], [198, 134, 94],
        [161, 102, 68], [120, 74, 48], [89, 55, 38], [232, 190, 172],
    ],
    dtype=np.float64,
)  # fmt: skip
HAIR_COLORS = np.array(
    [[20, 16, 14], [60, 40, 28], [110, 72, 40], [180, 140, 80], [140, 60, 30], [170, 170, 170]],
    dtype=np.float64,
)
IRIS_COLORS = np.array([[60, 40, 25], [90, 60, 30], [60, 100, 140], [70, 110, 70], [40, 30, 25]])
HAIR_STYLES = ("short", "long", "bald", "curly", "bun")


@dataclasses.dataclass(frozen=True)
class Identity:
    """Everything that makes one synthetic person look and sound like themselves."""

    skin: tuple[float, float, float]
    lips: tuple[float, float, float]
    hair: tuple[float, float, float]
    iris: tuple[float, float, float]
    shirt: tuple[float, float, float]
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    hair_style: str
    beard: bool
    face_width: float  # half-width of the face at the cheeks
    face_height: float  # eye line to chin
    forehead: float  # eye line to top of head
    squareness: float  # super-ellipse exponent of the jaw (2 round .. 3.5 square)
    eye_spacing: float
    eye_width: float
    eye_height: float
    brow_raise: float
    brow_thickness: float
    nose_length: float
    nose_width: float
    mouth_width: float
    lip_upper: float
    lip_lower: float
    background_seed: int
    voice: Voice

    @staticmethod
    def sample(rng: np.random.Generator) -> Identity:
        def jitter(color: np.ndarray, amount: float) -> tuple[float, float, float]:
            c = np.clip(color * rng.uniform(1 - amount, 1 + amount, 3), 0, 255)
            return tuple(float(v) for v in c)

        skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
        lips = skin * np.array([0.78, 0.55, 0.55]) + np.array([30, 0, 5])
        voice = Voice.sample(rng)
        high_voice = voice.f0 > 160
        bg = rng.uniform(40, 220, 3)
        return Identity(
            skin=jitter(skin, 0.05),
            lips=jitter(lips, 0.08),
            hair=jitter(HAIR_COLORS[rng.integers(len(HAIR_COLORS))], 0.1),
            iris=jitter(IRIS_COLORS[rng.integers(len(IRIS_COLORS))].astype(float), 0.1),
            shirt=tuple(float(v) for v in rng.uniform(20, 235, 3)),
            background=(tuple(float(v) for v in bg), jitter(bg * rng.uniform(0.5, 0.9), 0.2)),
            hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
            beard=bool(not high_voice and rng.random() < 0.35),
            face_width=float(rng.uniform(0.17, 0.215)),
            face_height=float(rng.uniform(0.29, 0.35)),
            forehead=float(rng.uniform(0.17, 0.22)),
            squareness=float(rng.uniform(2.0, 3.4)),
            eye_spacing=float(rng.uniform(0.072, 0.09)),
            eye_width=float(rng.uniform(0.052, 0.066)),
            eye_height=float(rng.uniform(0.020, 0.030)),
            brow_raise=float(rng.uniform(0.045, 0.06)),
            brow_thickness=float(rng.uniform(0.007, 0.014)),
            nose_length=float(rng.uniform(0.085, 0.11)),
            nose_width=float(rng.uniform(0.030, 0.042)),
            mouth_width=float(rng.uniform(0.050, 0.064)),
            lip_upper=float(rng.uniform(0.010, 0.018)),
            lip_lower=float(rng.uniform(0.013, 0.022)),
            background_seed=int(rng.integers(2**31)),
            voice=voice,
        )


# ----------------------------------------------------------------------------- articulation


def articulation_track(
    segments: list[Segment], num_frames: int, fps: int, sample_rate: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mouth articulation at each video frame's centre time, and the viseme sounding there.

    Targets are piecewise constant per phoneme and smoothed with a 30 ms Gaussian (lips
    cannot jump), exactly the timeline the speech was synthesised from.
    Returns (num_frames, 6) articulation (ARTICULATION_KEYS) and (num_frames,) int visemes.
    """
    from dithead_jax.synthetic.speech import PHONEMES

    frame_ms = 1000.0 / fps
    step = sample_rate // 1000  # work at 1 ms resolution
    n_ms = int(np.ceil(segments[-1].end / step))
    targets = np.zeros((n_ms, len(ARTICULATION_KEYS)))
    for seg in segments:
        p = PHONEMES[seg.phoneme]
        values = PHONEME_ARTICULATION.get(seg.phoneme, VISEME_ARTICULATION[p.viseme])
        targets[seg.start // step : -(-seg.end // step)] = values
        if seg.stress > 0 and p.kind == "vowel":  # stressed vowels open wider
            targets[seg.start // step : -(-seg.end // step), 0] *= 1 + 0.25 * seg.stress
    sigma = 30.0
    kernel = np.exp(-0.5 * (np.arange(-90, 91) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(targets, ((90, 90), (0, 0)), mode="edge")
    smooth = np.stack([np.convolve(padded[:, j], kernel, "valid") for j in range(6)], 1)
    centres_ms = (np.arange(num_frames) + 0.5) * frame_ms
    idx = np.clip(np.round(centres_ms).astype(int), 0, n_ms - 1)
    starts = np.array([s.start for s in segments])
    seg_idx = np.searchsorted(starts, idx * step, side="right") - 1
    visemes = np.array([PHONEMES[segments[i].phoneme].viseme for i in seg_idx], dtype=np.int32)
    return smooth[idx].astype(np.float32), visemes


def head_motion(rng: np.random.Generator, num_frames: int, fps: int) -> np.ndarray:
    """Smooth drift of a filmed head: (num_frames, 5) = tx, ty, roll (rad), scale, yaw."""
    t = np.arange(num_frames) / fps
    amplitudes = np.array([0.025, 0.015, 0.05, 0.03, 0.02])
    motion = np.zeros((num_frames, 5))
    for k in range(5):
        for _ in range(3):  # a few incommensurate slow sinusoids per degree of freedom
            f = rng.uniform(0.08, 0.6)
            motion[:, k] += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))
        motion[:, k] *= amplitudes[k] / 2
    motion[:, 3] += 1.0
    return motion


def blink_track(rng: np.random.Generator, num_frames: int, fps: int) -> np.ndarray:
    """Eye openness per frame (1 open, 0 shut): blinks every 2-6 s, ~0.2 s long."""
    openness = np.ones(num_frames)
    t = rng.uniform(0.3, 3.0)
    while t * fps < num_frames:
        duration = rng.uniform(0.15, 0.25) * fps
        start = t * fps
        frames = np.arange(num_frames)
        phase = (frames - start) / duration
        inside = (phase >= 0) & (phase <= 1)
        openness[inside] = np.minimum(openness[inside], np.abs(2 * phase[inside] - 1) ** 0.7)
        t += rng.uniform(2.0, 6.0)
    return openness


# ----------------------------------------------------------------------------- geometry


def _arc(s: np.ndarray, left: np.ndarray, right: np.ndarray, lift: float, power: float):
    """Curve from `left` to `right` bulging by `lift` (negative = up) at the middle."""
    s = np.asarray(s, dtype=np.float64)[:, None]
    base = left + (right - left) * s
    bulge = np.sin(np.pi * s) ** power
    return base + np.array([0.0, lift]) * bulge


@dataclasses.dataclass
class FaceGeometry:
    """Head-frame curves of one frame; `landmarks` (68, 2) lie on them."""

    landmarks: np.ndarray
    curves: dict[str, np.ndarray]


def face_geometry(
    ident: Identity, art: np.ndarray, eye_open: float, gaze: np.ndarray
) -> FaceGeometry:
    """Evaluates every feature curve for an articulation vector and eye openness."""
    opening, width, rounding, _, tuck, press = art
    W, eye_y = ident.face_width, -0.05
    jaw_drop = 0.6 * opening
    curves: dict[str, np.ndarray] = {}

    # Jaw (0-16): a super-ellipse from one temple, round the chin, to the other.
    def jaw(u: np.ndarray) -> np.ndarray:
        theta = np.pi * u
        c, s = np.cos(theta), np.sin(theta)
        p = 2.0 / ident.squareness
        x = -W * np.sign(c) * np.abs(c) ** p * (1 - 0.12 * s**4)
        y = eye_y + 0.01 + (ident.face_height - 0.01) * np.abs(s) ** p + jaw_drop * s**3
        return np.stack([x, y], 1)

    jaw_points = jaw(np.arange(17) / 16)
    curves["jaw"] = jaw(np.linspace(0, 1, 65))
    base_y = eye_y + 0.01
    top = base_y - ident.forehead
    phi = np.linspace(0, np.pi, 33)

    def dome(scale_x: float, lift: float) -> np.ndarray:
        """The top of the head from the right temple over to the left one."""
        y = base_y - (base_y - top + lift) * np.sin(phi) ** 0.8
        return np.stack([W * scale_x * np.cos(phi), y], 1)

    curves["forehead"] = dome(1.02, 0.0)
    curves.update(_hair(ident, dome, base_y, top))

    # Brows (17-21, 22-26) along their centre lines.
    def brow(cx: float, u: np.ndarray) -> np.ndarray:
        half = ident.eye_width * 0.75
        x = cx - half + 2 * half * u
        y = eye_y - ident.brow_raise - 0.012 * np.sin(np.pi * u)
        return np.stack([x, y], 1)

    brow_u = np.linspace(0, 1, 5)
    right_brow, left_brow = brow(-ident.eye_spacing, brow_u), brow(ident.eye_spacing, brow_u)
    curves["brow_r"], curves["brow_l"] = right_brow, left_brow

    # Nose: bridge 27-30 down the midline, base 31-35 from ala to ala through 33.
    nose_top, nose_tip = eye_y - 0.005, eye_y + ident.nose_length
    bridge = np.stack([np.zeros(4), np.linspace(nose_top, nose_tip, 4)], 1)
    nw = ident.nose_width
    base = np.array(
        [[-nw, nose_tip + 0.004], [-nw / 2, nose_tip + 0.012], [0, nose_tip + 0.016],
         [nw / 2, nose_tip + 0.012], [nw, nose_tip + 0.004]]
    )  # fmt: skip

    # Eyes (36-41 image-left, 42-47 image-right): almond curves; upper lid closes on blinks.
    def eye(cx: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ew, eh = ident.eye_width, ident.eye_height
        left, right = np.array([cx - ew / 2, eye_y]), np.array([cx + ew / 2, eye_y])
        up = lambda u: _arc(u, left, right, -eh * (0.1 + 0.9 * eye_open), 0.8)
        down = lambda u: _arc(u, left, right, eh * 0.75, 0.9)
        u = np.array([0.0, 1 / 3, 2 / 3, 1.0])
        upper, lower = up(u), down(u)
        # iBUG order for both eyes: left corner, two upper, right corner, two lower (the
        # lower ones right to left), i.e. clockwise in the image.
        pts = np.concatenate([upper, lower[[2, 1]]])
        dense = np.concatenate([up(np.linspace(0, 1, 24)), down(np.linspace(1, 0, 24))])
        return pts, dense, np.array([cx, eye_y + 0.1 * eh]) + gaze * ew * 0.2

    right_eye, curves["eye_r"], iris_r = eye(-ident.eye_spacing)
    left_eye, curves["eye_l"], iris_l = eye(ident.eye_spacing)
    curves["iris"] = np.array([iris_r, iris_l])

    # Lips. Inner lip 60-67 and outer lip 48-59 as arcs between the mouth corners.
    mouth_y = nose_tip + 0.25 * (ident.face_height - ident.nose_length) + 0.02
    mw = ident.mouth_width * width
    upper_thick = ident.lip_upper * (1 - 0.3 * press) * (1 + 0.3 * rounding)
    lower_thick = ident.lip_lower * (1 - 0.3 * press) * (1 + 0.3 * rounding) * (1 - 0.35 * tuck)
    corner_l = np.array([-mw, mouth_y + 0.3 * jaw_drop])
    corner_r = np.array([mw, mouth_y + 0.3 * jaw_drop])
    inner_power = 0.8 - 0.4 * rounding  # rounder mouths have fuller sides
    upper_gap = 0.35 * opening
    lower_gap = opening - upper_gap
    inner_up = lambda u: _arc(
        u, corner_l + [mw * 0.12, 0], corner_r - [mw * 0.12, 0], -upper_gap, inner_power
    )
    inner_down = lambda u: _arc(
        u, corner_l + [mw * 0.12, 0], corner_r - [mw * 0.12, 0], lower_gap, inner_power
    )
    outer_up = lambda u: (
        _arc(u, corner_l, corner_r, -upper_gap - upper_thick, 0.7)
        + np.stack([np.zeros_like(u), 0.25 * upper_thick * np.exp(-(((u - 0.5) / 0.07) ** 2))], 1)
    )  # the dip of the Cupid's bow
    outer_down = lambda u: _arc(u, corner_l, corner_r, lower_gap + lower_thick, 0.9)
    u_in, u_out = np.linspace(0, 1, 5), np.linspace(0, 1, 7)
    inner = np.concatenate([inner_up(u_in), inner_down(u_in[[3, 2, 1]])])
    outer = np.concatenate([outer_up(u_out), outer_down(u_out[[5, 4, 3, 2, 1]])])
    dense_u = np.linspace(0, 1, 40)
    curves["inner_lip"] = np.concatenate([inner_up(dense_u), inner_down(dense_u[::-1])])
    curves["outer_lip"] = np.concatenate([outer_up(dense_u), outer_down(dense_u[::-1])])
    curves["inner_upper"] = inner_up(dense_u)
    curves["inner_lower"] = inner_down(dense_u)
    curves["mouth_corners"] = np.array([corner_l, corner_r])
    curves["nose_base"] = base

    landmarks = np.concatenate(
        [jaw_points, right_brow, left_brow, bridge, base, right_eye, left_eye, outer, inner]
    )
    assert landmarks.shape == (68, 2)
    return FaceGeometry(landmarks=landmarks, curves=curves)


def _hair(ident: Identity, dome, base_y: float, top: float) -> dict[str, np.ndarray]:
    """Hair outlines in the head frame: `hair_front` over the forehead, `hair_back` behind."""
    W, out = ident.face_width, {}
    style = ident.hair_style
    if style != "bald":
        # Cap over the skull, closed by a wavy hairline across the upper forehead.
        hair_y = top + (0.3 if style != "bun" else 0.22) * (base_y - top)
        x = np.linspace(-0.97 * W, 0.97 * W, 25)
        wave = 0.008 * np.sin(9 * x / W) + 0.05 * (x / W) ** 6
        hairline = np.stack([x, hair_y + wave], 1)
        hairline = np.concatenate(
            [[[-1.04 * W, base_y - 0.02]], hairline, [[1.04 * W, base_y - 0.02]]]
        )
        out["hair_front"] = np.concatenate([dome(1.09, 0.025), hairline])
    if style == "long":
        out["hair_back"] = np.concatenate(
            [dome(1.16, 0.03), [[-1.25 * W, base_y + 0.42], [1.25 * W, base_y + 0.42]]]
        )
    elif style in ("curly", "bun"):
        centre = np.array([0.0, top + (0.05 if style == "curly" else -0.03)])
        radius = np.array([1.35 * W, 0.9 * (base_y - top)]) * (1.0 if style == "curly" else 0.5)
        angle = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        out["hair_back"] = centre + radius * np.stack([np.cos(angle), np.sin(angle)], 1)
    return out


# Head-frame units are image sizes at this zoom: the face spans about half the frame width,
# like a cropped interview shot.
HEAD_SCALE = 1.3

# How far each feature stands out of the face plane: under yaw, nearer features shift more
# than the outline (a cheap 2.5-D parallax that makes the head read as turning).
LANDMARK_DEPTH = np.concatenate(
    [np.full(17, -0.3), np.full(10, 0.4), [0.5, 0.7, 0.9, 1.0], np.full(5, 0.8),
     np.full(12, 0.35), np.full(20, 0.6)]
)  # fmt: skip
CURVE_DEPTH = {
    "jaw": -0.3, "forehead": -0.3, "brow_r": 0.4, "brow_l": 0.4, "eye_r": 0.35, "eye_l": 0.35,
    "iris": 0.4, "inner_lip": 0.6, "outer_lip": 0.6, "inner_upper": 0.6, "inner_lower": 0.6,
    "mouth_corners": 0.6, "nose_base": 0.8, "hair_front": -0.3, "hair_back": -0.5,
}  # fmt: skip


def posed(geometry: FaceGeometry, pose: np.ndarray, size: float) -> FaceGeometry:
    """Head frame -> image pixels: yaw parallax, then roll, scale and translation."""
    tx, ty, roll, scale, yaw = pose
    c, s = np.cos(roll), np.sin(roll)
    rotation = np.array([[c, s], [-s, c]]) * scale * HEAD_SCALE
    centre = np.array([0.5 + tx, 0.45 + ty])

    def move(points: np.ndarray, depth: np.ndarray | float) -> np.ndarray:
        shifted = points + np.stack(
            [yaw * np.broadcast_to(depth, len(points)), 0 * points[:, 0]], 1
        )
        return (shifted @ rotation + centre) * size

    return FaceGeometry(
        landmarks=move(geometry.landmarks, LANDMARK_DEPTH),
        curves={k: move(v, CURVE_DEPTH[k]) for k, v in geometry.curves.items()},
    )
