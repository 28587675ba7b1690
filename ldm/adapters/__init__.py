"""Adapters on the plain layers of :mod:`ldm.models`: prompt weighting and long prompts (:mod:`.prompts`),
textual inversion embeddings (:mod:`.embeddings`)."""
