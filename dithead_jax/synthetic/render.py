"""Draws synthetic talking-face clips: geometry from `synthetic.face`, pixels from PIL.

Drawing happens at SUPERSAMPLE x the output size and is box-filtered down (anti-aliasing).
Colours of the mouth interior, teeth and eye whites are distinct from skin and lips so
tests can find them in the pixels and check them against the landmarks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dithead_jax.synthetic.face import (
    SUPERSAMPLE,
    FaceGeometry,
    Identity,
    articulation_track,
    blink_track,
    face_geometry,
    head_motion,
    posed,
)
from dithead_jax.synthetic.speech import Segment


@dataclasses.dataclass(frozen=True)
class Palette:
    """Colours shared by every identity. Tests swap in vivid ones to find features in pixels."""

    mouth_interior: tuple[int, int, int] = (58, 16, 24)
    teeth: tuple[int, int, int] = (236, 232, 218)
    tongue: tuple[int, int, int] = (170, 70, 80)
    eye_white: tuple[int, int, int] = (238, 236, 232)
    pupil: tuple[int, int, int] = (12, 10, 10)


DEFAULT_PALETTE = Palette()


@dataclasses.dataclass(frozen=True)
class RenderedClip:
    frames: np.ndarray  # (T, S, S, 3) uint8
    # (T, 68, 2) float32, iBUG-68 (x, y) in pixels, pixel centres at integer coordinates
    # (the convention of dlib, FAN and OpenCV).
    landmarks: np.ndarray
    mouth_open: np.ndarray  # (T,) float32, inner-lip gap / face width
    viseme: np.ndarray  # (T,) int32, speech.Viseme
    articulation: np.ndarray  # (T, 6) float32, face.ARTICULATION_KEYS
    pose: np.ndarray  # (T, 5) float32: tx, ty, roll, scale, yaw
    eye_open: np.ndarray  # (T,) float32


def _rgb(color, scale: float = 1.0) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * scale, 0, 255)) for c in color)


def _poly(points: np.ndarray) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points]


def background(ident: Identity, size: int) -> Image.Image:
    """A static, soft room-like backdrop: a gradient and a few blurred panels."""
    rng = np.random.default_rng(ident.background_seed)
    top, bottom = np.array(ident.background[0]), np.array(ident.background[1])
    ramp = np.linspace(0, 1, size)[:, None, None]
    sideways = rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, size)[None, :, None]
    pixels = top * (1 - ramp) + bottom * ramp
    pixels = pixels * (1 + sideways)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(-0.2, 0.9, 2) * size
        w, h = rng.uniform(0.15, 0.6, 2) * size
        color = tuple(int(c) for c in rng.uniform(30, 230, 3)) + (int(rng.uniform(40, 110)),)
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
        else:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
    return img.filter(ImageFilter.GaussianBlur(size / 60))


def lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """A static key light from one side: (size, size, 1) multiplicative field."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    field = 1.0 + 0.18 * (np.cos(angle) * xx + np.sin(angle) * yy) * 2
    return field[..., None].astype(np.float32)


def _ellipse(draw: ImageDraw.ImageDraw, centre, rx: float, ry: float, fill) -> None:
    cx, cy = centre
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def draw_frame(
    ident: Identity,
    g: FaceGeometry,
    art: np.ndarray,
    bg: Image.Image,
    size: int,
    palette: Palette = DEFAULT_PALETTE,
) -> Image.Image:
    """One frame at supersampled resolution `size`; `g` is already posed to those pixels."""
    img = bg.copy()
    draw = ImageDraw.Draw(img, "RGBA")
    skin, c = ident.skin, g.curves
    jaw, forehead = c["jaw"], c["forehead"]
    face_w = np.linalg.norm(jaw[0] - jaw[-1])

    # Shoulders and neck (behind the face), hair that falls behind the head.
    chin = jaw[len(jaw) // 2]
    shoulder_y = chin[1] + 0.075 * size
    draw.polygon(
        _poly(np.array([[chin[0] - 0.45 * size, size * 1.1], [chin[0] - 0.3 * size, shoulder_y],
                        [chin[0] + 0.3 * size, shoulder_y], [chin[0] + 0.45 * size, size * 1.1]])),
        fill=_rgb(ident.shirt),
    )  # fmt: skip
    if "hair_back" in c:
        draw.polygon(_poly(c["hair_back"]), fill=_rgb(ident.hair, 0.85))
    neck_l, neck_r = jaw[len(jaw) // 4], jaw[3 * len(jaw) // 4]
    draw.polygon(
        _poly(np.array([neck_l, neck_r, [neck_r[0] + 0.02 * size, shoulder_y + 0.02 * size],
                        [neck_l[0] - 0.02 * size, shoulder_y + 0.02 * size]])),
        fill=_rgb(skin, 0.78),
    )  # fmt: skip
    for side in (0, -1):  # ears
        ear = jaw[side] + np.array([0, 0.035 * size])
        _ellipse(draw, ear, 0.03 * face_w * 2.2, 0.05 * size, _rgb(skin, 0.9))

    # Face, then a soft edge shading so it reads as round rather than flat.
    face = np.concatenate([jaw, forehead[1:-1]])
    draw.polygon(_poly(face), fill=_rgb(skin))
    if ident.beard:
        jl = jaw[10:-10]
        beard = np.concatenate([jl, c["outer_lip"][:40][::-1] + [0, 0.012 * size]])
        draw.polygon(_poly(beard), fill=_rgb(ident.hair) + (150,))

    # Eyes: white, iris and pupil, then lids re-drawn in skin to clip the iris.
    for name, iris_centre in (("eye_r", c["iris"][0]), ("eye_l", c["iris"][1])):
        eye = c[name]
        half = len(eye) // 2
        upper, lower = eye[:half], eye[half:][::-1]
        draw.polygon(_poly(eye), fill=palette.eye_white)
        r = 0.34 * np.linalg.norm(eye[0] - eye[half - 1])
        _ellipse(draw, iris_centre, r, r, _rgb(ident.iris))
        _ellipse(draw, iris_centre, r * 0.45, r * 0.45, palette.pupil)
        _ellipse(draw, iris_centre - [r * 0.3, r * 0.35], r * 0.18, r * 0.18, (250, 250, 250))
        top = min(upper[:, 1].min(), iris_centre[1] - r) - 2
        bottom = max(lower[:, 1].max(), iris_centre[1] + r) + 2
        draw.polygon(
            _poly(np.concatenate([upper, [[upper[-1, 0], top], [upper[0, 0], top]]])),
            fill=_rgb(skin),
        )  # noqa: E501
        draw.polygon(
            _poly(np.concatenate([lower, [[lower[-1, 0], bottom], [lower[0, 0], bottom]]])),
            fill=_rgb(skin),
        )  # noqa: E501
        draw.line(_poly(upper), fill=(40, 28, 24), width=max(1, round(size / 160)))
        draw.line(_poly(lower), fill=_rgb(skin, 0.7), width=max(1, round(size / 400)))
        draw.line(
            _poly(upper - [0, 0.012 * size]),
            fill=_rgb(skin, 0.86) + (160,),
            width=max(1, round(size / 250)),
        )  # noqa: E501

    # Brows: a tapered band around the centre line.
    thick = ident.brow_thickness * size
    for name, inner_first in (("brow_r", False), ("brow_l", True)):
        line = c[name]
        taper = (
            np.linspace(1.0, 0.55, len(line)) if inner_first else np.linspace(0.55, 1.0, len(line))
        )
        band = np.concatenate(
            [line - np.outer(taper, [0, thick / 2]), (line + np.outer(taper, [0, thick / 2]))[::-1]]
        )
        brow_colour = 0.45 * np.array(ident.hair) + 0.25 * np.array(ident.skin)
        draw.polygon(_poly(band), fill=_rgb(brow_colour))

    # Nose: a shadow down one side of the bridge, the tip and the nostrils.
    base = c["nose_base"]
    tip = base[2] - [0, 0.02 * size]
    nose_w = np.linalg.norm(base[0] - base[-1])
    _ellipse(draw, tip, nose_w * 0.42, nose_w * 0.32, _rgb(skin, 0.92))
    bridge_top = (c["eye_r"][0] + c["eye_l"][0]) / 2 * 0 + (c["brow_r"][-1] + c["brow_l"][0]) / 2
    draw.line(
        _poly(np.array([bridge_top + [nose_w * 0.22, nose_w * 0.5], tip + [nose_w * 0.3, 0]])),
        fill=_rgb(skin, 0.8) + (170,),
        width=max(1, round(size / 200)),
    )  # noqa: E501
    for k in (1, 3):
        _ellipse(draw, base[k] - [0, 0.004 * size], nose_w * 0.11, nose_w * 0.06, _rgb(skin, 0.45))

    # Mouth: lips, the dark interior, teeth hanging from the upper lip, the tongue below.
    opening, _, _, teeth, _, _ = art
    draw.polygon(_poly(c["outer_lip"]), fill=_rgb(ident.lips))
    up, low = c["inner_upper"], c["inner_lower"]
    if np.max(low[:, 1] - up[:, 1]) > 0.25:  # pixels (supersampled): an opening to draw
        draw.polygon(_poly(c["inner_lip"]), fill=palette.mouth_interior)
        gap = low[:, 1] - up[:, 1]
        tongue_top = low - np.stack([0 * gap, 0.35 * gap], 1)
        draw.polygon(_poly(np.concatenate([low, tongue_top[::-1]])), fill=palette.tongue)
        if teeth > 0.05:
            teeth_h = np.minimum(gap, teeth * 0.022 * size)
            teeth_low = up + np.stack([0 * gap, teeth_h], 1)
            draw.polygon(_poly(np.concatenate([up, teeth_low[::-1]])), fill=palette.teeth)
    draw.line(_poly(up), fill=_rgb(ident.lips, 0.55), width=max(1, round(size / 220)))
    corners = c["mouth_corners"]
    for corner in corners:
        _ellipse(draw, corner, size / 300, size / 300, _rgb(ident.lips, 0.5))
    del opening

    # Hair on top of the head.
    if "hair_front" in c:
        draw.polygon(_poly(c["hair_front"]), fill=_rgb(ident.hair))
    return img


def face_shading(face_polygon: np.ndarray, size: int) -> np.ndarray:
    """Darkens the face towards its outline: (size, size, 1) multiplicative field."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(_poly(face_polygon), fill=255)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(size / 28)), np.float32) / 255
    hard = np.asarray(mask, np.float32) / 255
    return (1.0 - 0.22 * hard * (1 - soft) ** 1.5)[..., None]


def draw_posed_frame(
    ident: Identity,
    g: FaceGeometry,
    art: np.ndarray,
    bg: Image.Image,
    light: np.ndarray,
    size: int,
    palette: Palette = DEFAULT_PALETTE,
) -> np.ndarray:
    """Draws geometry posed to `size` pixels (pixel centres at integers): (size, size, 3) uint8."""
    # Supersampled pixel X averages into output pixel (X - (S - 1) / 2) / S, so a point at
    # output coordinate x is drawn at S * x + (S - 1) / 2 to land where its landmark says.
    offset = (SUPERSAMPLE - 1) / 2
    big = FaceGeometry(
        landmarks=g.landmarks * SUPERSAMPLE + offset,
        curves={k: v * SUPERSAMPLE + offset for k, v in g.curves.items()},
    )
    img = draw_frame(ident, big, art, bg, size * SUPERSAMPLE, palette).reduce(SUPERSAMPLE)
    face = np.concatenate([g.curves["jaw"], g.curves["forehead"][1:-1]])
    pixels = np.asarray(img, np.float32) * light * face_shading(face, size)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_clip(
    ident: Identity,
    segments: list[Segment],
    num_frames: int,
    fps: int,
    sample_rate: int,
    size: int,
    rng: np.random.Generator,
    palette: Palette = DEFAULT_PALETTE,
) -> RenderedClip:
    """Renders `num_frames` frames whose mouths follow `segments` exactly."""
    art, visemes = articulation_track(segments, num_frames, fps, sample_rate)
    poses = head_motion(rng, num_frames, fps)
    eyes = blink_track(rng, num_frames, fps)
    gaze_track = np.cumsum(rng.standard_normal((num_frames, 2)) * 0.02, 0)
    gaze_track = np.clip(gaze_track - gaze_track.mean(0), -1, 1)
    big = size * SUPERSAMPLE
    bg = background(ident, big)
    light = lighting(rng, size)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    landmarks = np.empty((num_frames, 68, 2), np.float32)
    mouth_open = np.empty(num_frames, np.float32)
    for i in range(num_frames):
        geometry = face_geometry(ident, art[i], eyes[i], gaze_track[i])
        image_geometry = posed(geometry, poses[i], size)
        frames[i] = draw_posed_frame(ident, image_geometry, art[i], bg, light, size, palette)
        landmarks[i] = image_geometry.landmarks
        lm = geometry.landmarks
        mouth_open[i] = np.linalg.norm(lm[66] - lm[62]) / np.linalg.norm(lm[16] - lm[0])
    return RenderedClip(
        frames=frames,
        landmarks=landmarks,
        mouth_open=mouth_open,
        viseme=visemes,
        articulation=art,
        pose=poses.astype(np.float32),
        eye_open=eyes.astype(np.float32),
    )
