"""``python -m ldm.sample`` and the ``ldm-sample`` command: generate images (the code is in :mod:`ldm.cli.sample`)."""
import sys

from ldm.cli import sample
from ldm.cli.common import exiting


def main() -> int:
    """The ``ldm-sample`` console script."""
    return exiting(sample.main(prog="ldm-sample"))


if __name__ == "__main__":
    sys.exit(exiting(sample.main(prog="python -m ldm.sample")))
