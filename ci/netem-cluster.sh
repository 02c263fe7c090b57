#!/usr/bin/env bash
# An emulated multi-host Dask cluster on this machine (root, Linux): a scheduler and
# N workers, each worker in its own network namespace with a tc-tbf-shaped link.
# Prints the scheduler address; Ctrl-C tears everything down.
#   sudo ci/netem-cluster.sh --workers 3 --rate 10mbit
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m dask_asgd.testing.netem "$@"
