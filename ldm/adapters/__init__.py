"""Adapters on the plain layers of :mod:`ldm.models`: LoRA / LoCon / LoHa / LoKr merged into the weights
(:mod:`ldm.adapters.lora`) and a separate VAE file (:mod:`ldm.adapters.vae`)."""
