"""``python -m ldm.sample`` and the ``ldm-sample`` command: generate images (the code is in :mod:`ldm.cli.sample`)."""

from ldm.cli import sample
from ldm.cli.common import exit_now, exiting


def main() -> int:
    """The ``ldm-sample`` console script (its wrapper exits with what this returns, so an in-process caller gets the
    status back: only the collector is frozen, :func:`~ldm.cli.common.exiting`)."""
    return exiting(sample.main(prog="ldm-sample"))


if __name__ == "__main__":
    exit_now(sample.main(prog="python -m ldm.sample"))
