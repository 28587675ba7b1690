"""Adapters on the plain layers of :mod:`ldm.models`: LoRA / LoCon / LoHa / LoKr merged into the weights
(:mod:`.lora`), a separate VAE file (:mod:`.vae`), prompt weighting and long prompts (:mod:`.prompts`), textual
inversion embeddings (:mod:`.embeddings`)."""
