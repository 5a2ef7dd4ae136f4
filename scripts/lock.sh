#!/usr/bin/env bash
# Regenerate requirements/cpu.lock (the exact set CI installs) from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-.venv/bin/uv}
find_links=(); [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
"$uv" pip compile pyproject.toml --extra cpu --extra dev "${find_links[@]}" \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --no-annotate \
  -o requirements/cpu.lock
