#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
# Creates .venv (PyTorch 2.13.0: the CPU build where one is installed or at hand, see README),
# installs requirements + test requirements + this package,
# installs Debian's Chromium for the browser test when running as root, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the browser test will skip (or fail under CI)"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0 -r requirements.txt -r requirements-test.txt -e .

python -m pytest "$@"
