#!/usr/bin/env python
"""Generate images: ``python sample.py --prompt "two red circles above a blue square"`` (see --help).

The code lives in ldm/cli/sample.py; an installed package runs it as ``ldm-sample`` or ``python -m ldm.sample``.
"""

from ldm.cli.common import exit_now
from ldm.cli.sample import main

if __name__ == "__main__":
    exit_now(main())
