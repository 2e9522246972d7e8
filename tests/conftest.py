"""Shared test set-up: fixtures live in tests/fixtures (see its README); nothing reads ../shared or the network."""

import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def one_thread():
    """One thread for tests of tiny networks: on a shared 2-core machine two spinning OpenMP threads
    make them several times slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
