"""Latent diffusion: train text-to-image models and run Stable Diffusion v1/v2 checkpoints."""

__version__ = "0.1.0"
