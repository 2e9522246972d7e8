"""A wheel of this repository works outside the checkout: `pip install git+...` users get the
bundled teaching weights by name, find weights they converted into ./weights, and nothing else is
packaged."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of this checkout (no stale build/ folder), unpacked into a folder of
    its own (no dependencies). The copy's weights/ also holds a converted network, as a user's would."""
    pytest.importorskip("setuptools", minversion="68")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in ("pyproject.toml", "README.md", "unetrpp", "weights/README.md", "weights/unetrpp_tiny_phantom"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "weights" / "unetrpp_tiny_phantom", src / "weights" / "unetrpp_synapse")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("unetrpp-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "site"),
                    str(wheel)], check=True)
    return wheel, tmp / "site"


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_the_package_and_only_the_teaching_weights(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    weights = sorted(n for n in names if n.startswith("unetrpp/weights/"))
    teaching = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "weights" / "unetrpp_tiny_phantom").iterdir())
    # the teaching weights and the folder's README; never converted weights beside them (unetrpp_synapse)
    assert weights == sorted(["unetrpp/weights/README.md"] + ["unetrpp/" + n for n in teaching])
    assert "unetrpp/weights/unetrpp_tiny_phantom/model.safetensors" in weights
    for sub in (p.parent.name for p in (ROOT / "unetrpp").glob("*/__init__.py")):  # every subpackage
        assert f"unetrpp/{sub}/__init__.py" in names
    assert {n for n in names if n.startswith("unetrpp/") and n.endswith(".py") and n.count("/") == 1} == \
        {"unetrpp/" + p.name for p in (ROOT / "unetrpp").glob("*.py")}


def test_installed_package_segments_with_bundled_and_converted_weights(installed, tmp_path):
    _, site = installed
    # A folder of the user's, away from the checkout, with weights they made under ./weights.
    shutil.copytree(ROOT / "weights" / "unetrpp_tiny_phantom", tmp_path / "weights" / "mine")
    code = ("import unetrpp, unetrpp.pretrained as p; print(unetrpp.__file__); "
            "print(sorted(p.local_weights())); print(p.load_pretrained('unetrpp_tiny_phantom').config.name)")
    done = run_installed(site, tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    where, names, name = done.stdout.splitlines()
    assert Path(where).is_relative_to(site)
    assert names == "['mine', 'unetrpp_tiny_phantom']" and name == "unetrpp_tiny"
    done = run_installed(site, tmp_path, "-m", "unetrpp", "predict", str(FIXTURE), "-o", "out",
                         "--weights", "unetrpp_tiny_phantom")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "example_ct_sm.nii.gz").is_file()


def test_every_top_level_name_exists_and_readme_the_package_names_it():
    """`from unetrpp import *` gives what README's "The package" lists: a name missing from the README
    is one a reader of the package cannot find, a listed name missing from the package an error."""
    import unetrpp

    section = (ROOT / "README.md").read_text().split("## The package", 1)[1].split("\n## ", 1)[0]
    assert [name for name in unetrpp.__all__ if f"`{name}`" not in section] == []
    assert [name for name in unetrpp.__all__ if getattr(unetrpp, name, None) is None] == []


def test_shell_scripts_keep_lf_line_endings_in_a_windows_checkout():
    """Git for Windows checks text out with CRLF by default: bash then stopped scripts/test.sh at its first
    line (`set -euo pipefail\\r`: invalid option name), in WSL or Git Bash."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    scripts = subprocess.run(["git", "ls-files", "*.sh"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    done = subprocess.run(["git", "check-attr", "eol", "--", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert scripts and done.stdout.splitlines() == [f"{name}: eol: lf" for name in scripts], done.stdout
