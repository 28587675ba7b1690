"""Adapters on the plain layers of :mod:`ldm.models`: LoRA / LoCon / LoHa / LoKr merged into the weights
(:mod:`.lora`), a separate VAE file (:mod:`.vae`), prompt weighting and long prompts (:mod:`.prompts`), textual
inversion embeddings (:mod:`.embeddings`)."""


def may_have_lora_tags(prompts) -> bool:
    """Whether any prompt could hold an A1111 ``<lora:...>`` / ``<lyco:...>`` tag: a test that needs no import of
    :mod:`.lora` (whose ``extract_lora_tags`` then reads the tags), so a run without LoRAs never imports it."""
    return any("<lora:" in p.lower() or "<lyco:" in p.lower() for p in prompts)
