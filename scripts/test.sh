#!/usr/bin/env bash
# Set up the environment, then run the test suite (extra arguments go to pytest, e.g. `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest "$@"
