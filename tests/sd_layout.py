"""The key/shape lists of real Stable Diffusion checkpoints in ../shared/sd-layout, for strict-layout tests.

    from sd_layout import read_layout       # tests/ is on sys.path under pytest
"""
from __future__ import annotations

from pathlib import Path

import pytest

LAYOUT_DIR = Path(__file__).resolve().parents[2] / "shared" / "sd-layout"


def read_layout(name: str, prefix: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key without prefix: (shape, dtype name)}`` for the keys of ``name`` (e.g. "sd-v1.tsv") under ``prefix``.

    Skips the calling test when the file is not there.
    """
    path = LAYOUT_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = {}
    for line in path.read_text().splitlines()[1:]:  # the first line is the header
        key, shape, dtype = line.split("\t")
        if key.startswith(prefix):
            rows[key[len(prefix):]] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return rows


def layout_shapes(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{key without prefix: shape}`` (see :func:`read_layout`)."""
    return {k: shape for k, (shape, _) in read_layout(name, prefix).items()}
