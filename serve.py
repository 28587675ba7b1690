#!/usr/bin/env python
"""Serve the model over HTTP: ``python serve.py`` (A1111-compatible API and a page at http://127.0.0.1:7860).

The code lives in ldm/serve/; an installed package runs it as ``ldm-serve`` or ``python -m ldm.serve``.
"""
import sys

from ldm.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
