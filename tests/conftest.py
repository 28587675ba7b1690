import os

# Idle OpenMP threads sleep instead of spinning: tests that start subprocesses (DDP, sample.py) or run beside
# other work do not starve each other on a 2-core machine. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Small, reproducible CPU runs: the default test suite must fit a 2-core machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
