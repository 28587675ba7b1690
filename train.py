#!/usr/bin/env python
"""Train a latent diffusion model: ``python train.py --base configs/demo/shapes_ldm.yaml`` (see ldm/cli/train.py).

An installed package runs it as ``ldm-train`` or ``python -m ldm.train``.
"""
import sys

from ldm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
