"""``python -m ldm.sample`` and the ``ldm-sample`` command: generate images (the code is in :mod:`ldm.cli.sample`)."""
import sys

from ldm.cli import sample


def main() -> int:
    """The ``ldm-sample`` console script."""
    return sample.main(prog="ldm-sample")


if __name__ == "__main__":
    sys.exit(sample.main(prog="python -m ldm.sample"))
