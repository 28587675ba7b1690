"""The HTTP server: an AUTOMATIC1111-compatible API and a page of its own (``python serve.py``, ``ldm-serve``).

- :mod:`ldm.serve.api`: the FastAPI app (:func:`create_app`, :class:`ServerConfig`), auth and size limits;
- :mod:`ldm.serve.worker`: the model worker thread and its queue;
- :mod:`ldm.serve.schema`: the A1111 request bodies;
- :mod:`ldm.serve.cli`: the command line; ``static/``: the page (plain HTML/CSS/JS, no build step, no CDN).

FastAPI and uvicorn come with ``pip install -e ".[serve]"`` (and with ``.[dev]``).
"""
