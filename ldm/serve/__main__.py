"""``python -m ldm.serve``: start the server (the code is in :mod:`ldm.serve.cli`)."""
import sys

from ldm.serve.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m ldm.serve"))
