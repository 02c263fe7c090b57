#!/usr/bin/env bash
# The GPU check: on a Linux machine with an NVIDIA GPU and CuPy, and no network,
# install dask-asgd from a folder of wheels brought along, run the tests marked
# `gpu` (CuPy against NumPy: models, filter, channel, estimators), then the
# benchmark, which checks CuPy's steps against NumPy's again at full size and
# prints samples/s for both. Each stage has a time limit, 5 minutes in all (the
# script has not yet run on a GPU: no GPU was available where it was written).
#
#   bash ci/gpu-check.sh [WHEELS_DIR]        # default: ./wheels
#
# Collect the wheels on a machine with network, the same Python version and the
# same platform (Linux x86_64), from a checkout of this repository:
#
#   python -m pip download -d wheels ".[test,gpu]" "setuptools>=68" wheel
#
# and copy `wheels/` beside the checkout on the GPU machine. There the script runs
#   pip install --no-index --find-links wheels -e ".[test]"
# (and the `gpu` extra only where CuPy is missing: an installed CuPy is kept).
# A machine that already has every dependency installed needs no wheels.
#
# Exit status: 0 when everything passed; non-zero when CuPy or a GPU is missing
# (the tests fail rather than skip here), a test failed, or CuPy and NumPy disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-wheels}"
PYTHON="${PYTHON:-python}"
start=$SECONDS

stage() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - start)); }
# limited SECONDS COMMAND...: run it, and say so when it ran out of time.
limited() {
    local rc=0
    timeout "$1" "${@:2}" || rc=$?
    [ "$rc" -ne 124 ] || echo "gpu-check: '${*:2}' ran past its limit of $1 s" >&2
    return "$rc"
}

stage "GPU"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
    echo "nvidia-smi not found; asking CuPy"
fi

stage "install from $WHEELS (no network)"
[ -d "$WHEELS" ] || echo "no folder $WHEELS: installing from what is installed already"
pip_install() { limited 90 "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "$@"; }
if "$PYTHON" -c "import cupy" 2>/dev/null; then
    pip_install -e ".[test]"
    # distributed reads CuPy arrays that arrive over TCP through rmm or numba.
    "$PYTHON" -c "import rmm" 2>/dev/null || "$PYTHON" -c "import numba.cuda" 2>/dev/null || pip_install numba
else
    pip_install -e ".[test,gpu]"
fi
"$PYTHON" -c "from dask_asgd.bench_gpu import find_cupy; device, said = find_cupy(); print(said); raise SystemExit(device is None)"

stage "tests marked gpu"
ASGD_GPU_REQUIRED=1 limited 120 "$PYTHON" -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_gpu.py

stage "benchmark and full-size check against NumPy"
limited 90 "$PYTHON" -m dask_asgd.bench_gpu --require-gpu

stage "done"
