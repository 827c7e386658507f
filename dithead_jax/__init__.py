"""dithead_jax: DiT-Head (audio-driven talking heads with a latent diffusion transformer) in JAX.

from dithead_jax import DiTHeadPipeline
pipe = DiTHeadPipeline.from_pretrained("runs/dit")          # or an exported folder
pipe(video="face.mp4", audio="speech.wav").save("dubbed.mp4")
"""

__version__ = "0.1.0"

__all__ = ["DiTHeadPipeline", "__version__"]


def __getattr__(name: str):
    # Lazily: importing the package (every CLI, conftest's device flags) must not import
    # jax before the caller has configured it.
    if name == "DiTHeadPipeline":
        from dithead_jax.pipeline import DiTHeadPipeline

        return DiTHeadPipeline
    raise AttributeError(f"module 'dithead_jax' has no attribute {name!r}")
