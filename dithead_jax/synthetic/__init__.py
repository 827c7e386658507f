"""The synthetic talking-face dataset: formant speech, parametric faces, rendering, preview."""
