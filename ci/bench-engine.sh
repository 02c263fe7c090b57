#!/usr/bin/env bash
# Parallel efficiency of the engine (asgd samples/s over N x a single-process loop).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[bench]"
dask-asgd bench engine "$@"
