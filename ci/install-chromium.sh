#!/usr/bin/env bash
# Debian's headless Chromium, for tests/test_dashboard.py's screenshot of the
# dashboard page. Does nothing when /usr/bin/chromium is already there.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq chromium > /dev/null
