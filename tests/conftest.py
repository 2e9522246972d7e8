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
