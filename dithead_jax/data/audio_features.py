"""Per-video-frame audio features and DiT-Head's 11-frame windows.

Two feature types, both one vector per video frame, windowed the same way:
  * `wav2vec2`: CTC logits of a Wav2Vec2ForCTC checkpoint (the paper's
    wav2vec2-large-xlsr-53-english: vocabulary 33). Logits come at 50 Hz; each video frame
    takes the mean of the logits whose receptive-field centres fall inside its 40 ms
    interval (for 25 fps that is exactly the pair 2i, 2i+1; DESIGN.md's "average each pair").
  * `logmel`: the weight-free fallback, 33 log-mel bands from a 64 ms window centred on each
    video frame's centre time, so everything downstream runs offline with the same layout.
Windows: frame i gets features i-5 .. i+5, edge-padded -> (11, 33) = 363 values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function


def peak_normalize(audio: np.ndarray) -> np.ndarray:
    """Scales to peak 1 (the paper's 'normalised to [-1, 1]'); silence stays silence."""
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    return (audio / peak).astype(np.float32) if peak > 0 else audio.astype(np.float32)


def logmel_features(
    audio: np.ndarray, sample_rate: int, num_frames: int, fps: float = 25, bands: int = 33
) -> np.ndarray:
    """(num_frames, bands) float32 log-mel energies centred on each video frame's centre."""
    hop = sample_rate / fps
    if abs(hop - round(hop)) > 1e-9:
        raise ValueError(f"sample rate {sample_rate} is not a multiple of {fps} fps")
    hop = int(round(hop))
    # spectrogram(center=True) centres frame j on sample j * hop; dropping half a hop
    # moves the centres to (j + 0.5) * hop, the middle of video frame j.
    shifted = np.asarray(audio, np.float64)[hop // 2 :]
    needed = num_frames * hop
    if len(shifted) < needed:
        shifted = np.pad(shifted, (0, needed - len(shifted)))
    n_fft = 1024
    filters = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=bands,
        min_frequency=55.0,
        max_frequency=min(7600.0, sample_rate / 2),
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    mel = spectrogram(
        shifted,
        window_function(n_fft, "hann"),
        frame_length=n_fft,
        hop_length=hop,
        power=2.0,
        center=True,
        pad_mode="constant",
        mel_filters=filters,
        log_mel=None,
    )[:, :num_frames]
    log_mel = np.log10(np.maximum(mel, 1e-10))
    # Whisper-style: keep 80 dB of dynamic range and bring values to roughly [-1, 1].
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return ((log_mel + 4.0) / 4.0).T.astype(np.float32)


def align_to_frames(
    features: np.ndarray, feature_times: np.ndarray, num_frames: int, fps: float
) -> np.ndarray:
    """Mean of the feature vectors whose centre times fall in each video frame's interval.

    features: (L, D) at times `feature_times` (L,) seconds. Frames with no feature inside
    their interval take the nearest one. Returns (num_frames, D).
    """
    frame_of = np.floor(feature_times * fps + 1e-9).astype(np.int64)
    out = np.zeros((num_frames, features.shape[1]), np.float64)
    counts = np.zeros(num_frames)
    valid = (frame_of >= 0) & (frame_of < num_frames)
    np.add.at(out, frame_of[valid], features[valid])
    np.add.at(counts, frame_of[valid], 1)
    empty = counts == 0
    if empty.any():
        centres = (np.arange(num_frames)[empty] + 0.5) / fps
        nearest = np.abs(feature_times[None, :] - centres[:, None]).argmin(1)
        out[empty] = features[nearest]
        counts[empty] = 1
    return (out / counts[:, None]).astype(np.float32)


def wav2vec2_features(
    audio: np.ndarray,
    sample_rate: int,
    num_frames: int,
    fps: float,
    model: Any,
    config: Any,
    feature_extractor: Any,
    chunk_seconds: float = 30.0,
) -> np.ndarray:
    """(num_frames, vocab) CTC logits of our Flax Wav2Vec2 aligned to video frames.

    Long audio runs in chunks of `chunk_seconds` with one second of context on each side,
    so memory stays flat for hour-long recordings.
    """
    from dithead_jax.models.wav2vec2 import frame_geometry, run_wav2vec2

    if sample_rate != feature_extractor.sampling_rate:
        raise ValueError(
            f"audio at {sample_rate} Hz; the feature extractor expects "
            f"{feature_extractor.sampling_rate} Hz"
        )
    receptive, stride = frame_geometry(config)
    chunk = int(chunk_seconds * sample_rate)
    context = sample_rate
    pieces, times = [], []
    for start in range(0, max(len(audio), 1), chunk):
        lo, hi = max(0, start - context), min(len(audio), start + chunk + context)
        inputs = feature_extractor(
            audio[lo:hi], sampling_rate=sample_rate, return_tensors="np"
        ).input_values.astype(np.float32)
        logits = run_wav2vec2(model, inputs)[0]
        centre = (lo + np.arange(len(logits)) * stride + receptive / 2) / sample_rate
        keep = (centre >= start / sample_rate) & (centre < (start + chunk) / sample_rate)
        pieces.append(logits[keep])
        times.append(centre[keep])
    return align_to_frames(np.concatenate(pieces), np.concatenate(times), num_frames, fps)


def audio_windows(per_frame: np.ndarray, window: int = 11) -> np.ndarray:
    """(T, D) -> (T, window, D): frame i gets i - window//2 .. i + window//2, edge-padded."""
    if window % 2 == 0:
        raise ValueError(f"audio window must be odd, got {window}")
    half = window // 2
    padded = np.pad(per_frame, ((half, half), (0, 0)), mode="edge")
    index = np.arange(len(per_frame))[:, None] + np.arange(window)[None, :]
    return padded[index]
