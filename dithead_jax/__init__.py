"""dithead_jax: DiT-Head (audio-driven talking heads with a latent diffusion transformer) in JAX."""

__version__ = "0.1.0"
