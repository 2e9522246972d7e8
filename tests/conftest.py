"""Shared test set-up: fixtures live in tests/fixtures (see its README); nothing reads ../shared or the network."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent

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


@pytest.fixture
def non_utf8_locale(tmp_path):
    """Run Python code (ASCII source) in a child process in tmp_path whose locale encoding is not UTF-8:
    ASCII under LC_ALL=C, a stand-in for Windows' usual cp1252, which holds "ü" but not "Ł". What the
    package writes and reads must not depend on the locale. Returns run(code) -> stdout."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    env.pop("LANG", None)
    probe = subprocess.run([sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
                           env=env, capture_output=True, text=True)
    if "utf" in probe.stdout.lower():
        pytest.skip(f"this system's C locale encodes text as {probe.stdout.strip()}")

    def run(code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run
