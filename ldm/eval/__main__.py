"""``python -m ldm.eval {geneval,recon} --ckpt PATH ...`` (see :mod:`ldm.eval.cli`)."""
from ldm.eval.cli import main

if __name__ == "__main__":
    main()
