#!/usr/bin/env bash
# The CUDA check of issue 7 in one command on the lent GPU machine: installs what the project needs
# there, then prints every figure of benchmarks/gpu.py (a few minutes on an H200).
#
# That machine cannot download. Its python3 (3.12) has torch, numpy, scipy, scikit-image, einops,
# safetensors, huggingface_hub, tqdm, matplotlib, narwhals and pytest-xdist, but not monai, nibabel
# or plotly (all pure Python), so carry them as wheels. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       monai==1.6.1 nibabel==5.4.2 plotly==7.1.0
# Then run it there with the wheels carried:
#   run(command="GPU_CHECK_TESTS=1 bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Arguments go to gpu.py (e.g. --compile-batches 4, or --budget 100 for a shorter run).
# GPU_CHECK_TESTS=1 then runs the test suite there too (on CUDA wherever a test leaves the device
# to segment()), without the viewer, browser and notebook tests, whose packages that machine lacks.
# Where the host CPU has AMX, the CPU forward pass (forward.py --bf16) is timed on two of its cores too
# (GPU_CHECK_AMX=0 skips it).
# With $OUT set (the device tool sets it) the output is also written to $OUT/gpu.log, amx.log and tests.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

missing=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("monai", "nibabel", "plotly") if not u.find_spec(m)))')
if [ -n "$missing" ]; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: $missing not installed and no wheels in .whl/; see the top of $0" >&2
        exit 1
    fi
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    else  # these wheels are pure Python: unpacking them is installing them
        for wheel in .whl/*.whl; do "$PY" -m zipfile -e "$wheel" /tmp/site; done
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c 'import monai, nibabel, unetrpp; print("monai", monai.__version__, " nibabel", nibabel.__version__)'
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv || true

export PYTHONUNBUFFERED=1
log() { if [ -n "${OUT:-}" ]; then tee "$OUT/$1"; else cat; fi; }
"$PY" benchmarks/gpu.py "$@" 2>&1 | log gpu.log || echo "gpu_check: benchmarks/gpu.py exited with an error (above)"
# Issue 7's bf16 goal is for a CPU with AMX; the GPU machine's host CPU may have it: time it there on two
# of its cores (a minute or two), as benchmarks/forward.py does on this project's own machine.
if grep -qw amx_bf16 /proc/cpuinfo && [ "${GPU_CHECK_AMX:-1}" = 1 ]; then
    echo "=== CPU forward pass on 2 cores of this host, which has AMX ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2))"
    pin=$(command -v taskset >/dev/null && echo "taskset -c 0,1" || true)
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES= timeout 200 $pin "$PY" benchmarks/forward.py --bf16 --no-swin --repeats 5 2>&1 \
        | log amx.log || echo "gpu_check: the AMX forward timing stopped early"
fi
if [ "${GPU_CHECK_TESTS:-0}" = 1 ]; then
    echo "=== the test suite on this machine"
    parallel=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8" || true)  # pytest-xdist, where present
    # shellcheck disable=SC2086
    # SIGINT at the limit, so that pytest still prints which tests failed
    timeout -s INT -k 20 240 "$PY" -m pytest -q $parallel -p no:cacheprovider -p no:benchmark -o log_level=WARNING \
        --ignore=tests/test_app_client.py --ignore=tests/test_browser.py --ignore=tests/test_notebooks.py \
        tests 2>&1 | log tests.log | grep -v '^DEBUG' | tail -30 || true
fi
