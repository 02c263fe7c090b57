#!/usr/bin/env bash
# The README's test command: install with the test extra, run the default suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[test]" && python -m pytest "$@"
