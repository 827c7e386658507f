"""Synthetic speech with an exact phoneme timeline: a small source-filter (Klatt-style) synthesiser.

Why our own synthesiser: the synthetic talking faces need audio whose phonetic content drives
the mouth with *exact* timing, deterministic for a seed, offline. A formant synthesiser gives
all three: every phoneme has a known start and end sample, a viseme, formant targets and a
frication spectrum, so the mouth shape is a function of what is said, not of loudness.

The signal chain per sample: glottal pulses (Rosenberg shape, jitter, shimmer, breathiness)
-> spectral tilt -> cascade of four time-varying formant resonators, plus parallel noise
sources for fricatives, bursts and aspiration, all driven by the same smoothed articulation
targets that drive the face.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
from scipy import signal


class Viseme(enum.IntEnum):
    """Mouth-shape classes. Values are stored in the dataset's `viseme` arrays."""

    SILENCE = 0
    CLOSED = 1  # m b p
    OPEN = 2  # a
    ROUNDED = 3  # o u w
    SPREAD = 4  # i e
    LIP_TEETH = 5  # f v
    DENTAL = 6  # s t d n l k g (tongue/teeth consonants, slightly open)


@dataclasses.dataclass(frozen=True)
class Phoneme:
    name: str
    viseme: Viseme
    kind: str  # vowel | nasal | glide | fricative | stop | silence
    formants: tuple[float, float, float]  # F1..F3 of a neutral adult vocal tract
    voiced: bool
    duration_ms: float
    frication: str | None = None  # noise filter name for fricatives/bursts


_P = Phoneme
PHONEMES: dict[str, Phoneme] = {
    p.name: p
    for p in [
        _P("a", Viseme.OPEN, "vowel", (760, 1250, 2550), True, 150),
        _P("e", Viseme.SPREAD, "vowel", (480, 1850, 2550), True, 130),
        _P("i", Viseme.SPREAD, "vowel", (300, 2250, 2950), True, 120),
        _P("o", Viseme.ROUNDED, "vowel", (480, 880, 2500), True, 140),
        _P("u", Viseme.ROUNDED, "vowel", (320, 800, 2350), True, 130),
        _P("m", Viseme.CLOSED, "nasal", (260, 1100, 2300), True, 85),
        _P("n", Viseme.DENTAL, "nasal", (260, 1550, 2500), True, 75),
        _P("l", Viseme.DENTAL, "glide", (360, 1150, 2700), True, 70),
        _P("w", Viseme.ROUNDED, "glide", (300, 650, 2300), True, 70),
        _P("b", Viseme.CLOSED, "stop", (250, 900, 2300), True, 85, "labial"),
        _P("p", Viseme.CLOSED, "stop", (250, 900, 2300), False, 95, "labial"),
        _P("d", Viseme.DENTAL, "stop", (300, 1700, 2600), True, 75, "alveolar"),
        _P("t", Viseme.DENTAL, "stop", (300, 1700, 2600), False, 85, "alveolar"),
        _P("g", Viseme.DENTAL, "stop", (300, 2000, 2400), True, 80, "velar"),
        _P("k", Viseme.DENTAL, "stop", (300, 2000, 2400), False, 90, "velar"),
        _P("f", Viseme.LIP_TEETH, "fricative", (400, 1400, 2500), False, 110, "labiodental"),
        _P("v", Viseme.LIP_TEETH, "fricative", (400, 1400, 2500), True, 90, "labiodental"),
        _P("s", Viseme.DENTAL, "fricative", (400, 1700, 2700), False, 115, "alveolar"),
        _P("_", Viseme.SILENCE, "silence", (500, 1500, 2500), False, 100),
    ]
}
VOWELS = "aeiou"
ONSETS = "mnlwbpdtgkfvs"
CODAS = "mnlstkpf"


@dataclasses.dataclass(frozen=True)
class Voice:
    """One speaker: pitch, rate and timbre."""

    f0: float  # mean fundamental frequency, Hz
    f0_range: float  # intonation excursion as a fraction of f0
    formant_scale: float  # vocal-tract length: ~0.9 low voices, ~1.18 high voices
    rate: float  # speaking-rate multiplier (1 = the durations in PHONEMES)
    tilt: float  # one-pole low-pass coefficient on the source (darker voice = larger)
    breathiness: float  # aspiration noise mixed into voicing
    jitter: float  # cycle-to-cycle pitch perturbation

    @staticmethod
    def sample(rng: np.random.Generator) -> Voice:
        high = rng.random() < 0.5
        return Voice(
            f0=float(rng.uniform(175, 240) if high else rng.uniform(88, 140)),
            f0_range=float(rng.uniform(0.10, 0.25)),
            formant_scale=float(rng.uniform(1.08, 1.2) if high else rng.uniform(0.9, 1.02)),
            rate=float(rng.uniform(0.8, 1.2)),
            tilt=float(rng.uniform(0.2, 0.5)),
            breathiness=float(rng.uniform(0.02, 0.12)),
            jitter=float(rng.uniform(0.005, 0.015)),
        )


@dataclasses.dataclass(frozen=True)
class Segment:
    """One phoneme occupying samples [start, end)."""

    phoneme: str
    start: int
    end: int
    stress: float  # 0..1, raises pitch and loudness on stressed vowels


def random_utterance(
    rng: np.random.Generator, voice: Voice, num_samples: int, sample_rate: int
) -> list[Segment]:
    """Words of 1-3 CV(C) syllables with pauses, filling exactly `num_samples` samples."""
    segments: list[Segment] = []
    cursor = 0

    def add(name: str, ms: float, stress: float = 0.0) -> None:
        nonlocal cursor
        n = max(1, round(ms * sample_rate / 1000.0))
        segments.append(Segment(name, cursor, cursor + n, stress))
        cursor += n

    add("_", rng.uniform(150, 400))
    while cursor < num_samples:
        for syllable in range(int(rng.integers(1, 4))):
            stress = float(syllable == 0) * rng.uniform(0.5, 1.0)
            jitter = lambda: rng.uniform(0.8, 1.25) / voice.rate
            if rng.random() < 0.85:
                c = ONSETS[rng.integers(len(ONSETS))]
                add(c, PHONEMES[c].duration_ms * jitter())
            v = VOWELS[rng.integers(len(VOWELS))]
            add(v, PHONEMES[v].duration_ms * jitter() * (1 + 0.4 * stress), stress)
            if rng.random() < 0.3:
                c = CODAS[rng.integers(len(CODAS))]
                add(c, PHONEMES[c].duration_ms * jitter())
        # Short pause between words, a longer one now and then between phrases.
        add("_", rng.uniform(350, 700) if rng.random() < 0.2 else rng.uniform(40, 140))
    # Trim to the clip: the last segment ends exactly at num_samples.
    kept = [s for s in segments if s.start < num_samples]
    last = kept[-1]
    kept[-1] = dataclasses.replace(last, end=num_samples)
    return kept


def phoneme_at(segments: list[Segment], samples: np.ndarray) -> list[str]:
    """The phoneme sounding at each sample index."""
    starts = np.array([s.start for s in segments])
    idx = np.searchsorted(starts, samples, side="right") - 1
    return [segments[i].phoneme for i in idx]


def _smooth(x: np.ndarray, sample_rate: int, ms: float) -> np.ndarray:
    """Articulator inertia: a Gaussian low-pass of the piecewise-constant targets."""
    sigma = ms * sample_rate / 1000.0
    radius = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, [(radius, radius)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    kernel = k if x.ndim == 1 else k[:, None]
    return signal.fftconvolve(pad, kernel, mode="valid", axes=0)


_NOISE_BANDS = {  # (low Hz, high Hz, gain) of each frication / burst source
    "labiodental": (1200, 7000, 0.18),
    "alveolar": (3800, 7600, 0.55),
    "labial": (300, 2200, 0.5),
    "velar": (1400, 3200, 0.6),
    "aspiration": (500, 5000, 0.25),
}


def _resonator(freq: float, bw: float, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Klatt's two-pole resonator with unit gain at DC."""
    r = np.exp(-np.pi * bw / sample_rate)
    c = -(r**2)
    b = 2 * r * np.cos(2 * np.pi * freq / sample_rate)
    return np.array([1.0 - b - c]), np.array([1.0, -b, -c])


def synthesize(
    segments: list[Segment], voice: Voice, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """Renders the utterance: float32 (num_samples,) with peak 0.9."""
    n = segments[-1].end
    # Per-sample articulation targets, then smoothed: formants, voicing, noise gains.
    formants = np.zeros((n, 3))
    voicing = np.zeros(n)
    noise = {name: np.zeros(n) for name in _NOISE_BANDS}
    stress = np.zeros(n)
    for seg in segments:
        p = PHONEMES[seg.phoneme]
        sl = slice(seg.start, seg.end)
        formants[sl] = np.array(p.formants) * voice.formant_scale
        stress[sl] = seg.stress
        length = seg.end - seg.start
        if p.kind in ("vowel", "glide"):
            voicing[sl] = 1.0 if p.kind == "vowel" else 0.6
        elif p.kind == "nasal":
            voicing[sl] = 0.45
        elif p.kind == "fricative":
            voicing[sl] = 0.35 if p.voiced else 0.0
            noise[p.frication][sl] = 1.0
        elif p.kind == "stop":
            # Closure (silence or a voice bar), then a short burst and aspiration.
            closure = int(length * 0.65)
            burst = slice(seg.start + closure, min(seg.end, seg.start + closure + 160))
            voicing[seg.start : seg.start + closure] = 0.15 if p.voiced else 0.0
            noise[p.frication][burst] = 1.0
            if not p.voiced:
                noise["aspiration"][seg.start + closure : seg.end] = 0.8
            else:
                voicing[seg.start + closure : seg.end] = 0.6
    formants = _smooth(formants, sample_rate, 18)
    voicing = _smooth(voicing, sample_rate, 6)
    stress = _smooth(stress, sample_rate, 40)
    noise = {k: _smooth(v, sample_rate, 3) for k, v in noise.items()}

    # Glottal source: pitch follows a falling phrase contour plus stressed-syllable accents.
    t = np.arange(n) / sample_rate
    slow = _smooth(rng.standard_normal(n), sample_rate, 120) * 8
    f0 = voice.f0 * (1 + voice.f0_range * (stress - 0.15 * t / max(t[-1], 1e-6) + 0.3 * slow))
    f0 *= 1 + voice.jitter * _smooth(rng.standard_normal(n), sample_rate, 2) * 5
    phase = np.cumsum(f0 / sample_rate) % 1.0
    open_phase, closing = 0.4, 0.16
    pulse = np.where(
        phase < open_phase,
        0.5 * (1 - np.cos(np.pi * phase / open_phase)),
        np.where(
            phase < open_phase + closing,
            np.cos(0.5 * np.pi * (phase - open_phase) / closing),
            0.0,
        ),
    )
    source = np.diff(pulse, prepend=0.0) * sample_rate / voice.f0  # lip radiation
    source = signal.lfilter([1 - voice.tilt], [1, -voice.tilt], source)
    white = rng.standard_normal(n)
    shimmer = 1 + 0.08 * _smooth(rng.standard_normal(n), sample_rate, 4)
    excitation = voicing * (1 + 0.3 * stress) * shimmer * source
    excitation += voice.breathiness * voicing * white * (phase < 0.5)
    excitation += _NOISE_BANDS["aspiration"][2] * noise["aspiration"] * white

    # Cascade formant filter, block-wise time-varying (2 ms blocks, filter state carried).
    bandwidths = (70.0, 100.0, 150.0, 220.0)
    f4 = 3400.0 * voice.formant_scale
    voiced_out = np.zeros(n)
    block = sample_rate // 500
    states = [np.zeros(2) for _ in range(4)]
    for start in range(0, n, block):
        sl = slice(start, min(n, start + block))
        y = excitation[sl]
        freqs = (*formants[start], f4)
        for k in range(4):
            b, a = _resonator(min(freqs[k], 0.45 * sample_rate), bandwidths[k], sample_rate)
            y, states[k] = signal.lfilter(b, a, y, zi=states[k])
        voiced_out[sl] = y

    # Fricatives and bursts: fixed band-pass noise sources with time-varying gains.
    fric_out = np.zeros(n)
    nyquist = sample_rate / 2
    for name in ("labiodental", "alveolar", "labial", "velar"):
        low, high, gain = _NOISE_BANDS[name]
        sos = signal.butter(
            4, [low / nyquist, min(high, 0.95 * nyquist) / nyquist], "band", output="sos"
        )
        fric_out += gain * noise[name] * signal.sosfilt(sos, rng.standard_normal(n))

    # Fricatives sit ~10-20 dB below the vowels, as in natural speech.
    vowel_rms = np.sqrt(np.mean(voiced_out[voicing > 0.9] ** 2)) if (voicing > 0.9).any() else 1.0
    audio = voiced_out + 0.5 * vowel_rms * fric_out
    audio = signal.sosfilt(signal.butter(2, 60 / nyquist, "high", output="sos"), audio)
    peak = np.abs(audio).max()
    if peak == 0:  # a clip too short to hold a phoneme: silence with a noise floor
        return (1e-4 * rng.standard_normal(n)).astype(np.float32)
    audio += 1e-3 * peak * rng.standard_normal(n)  # room noise floor
    return (0.9 * audio / np.abs(audio).max()).astype(np.float32)
