"""``python -m ldm.train`` and the ``ldm-train`` command: train a model (the code is in :mod:`ldm.cli.train`)."""
import sys

from ldm.cli import train


def main() -> int:
    """The ``ldm-train`` console script."""
    return train.main(prog="ldm-train")


if __name__ == "__main__":
    sys.exit(train.main(prog="python -m ldm.train"))
