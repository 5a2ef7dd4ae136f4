#!/usr/bin/env bash
# Set up (or bring up to date) the project's virtual environment in .venv.
# A rerun with unchanged pyproject.toml and lock files does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TRUSTRAY_VENV:-.venv}
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9
stamp=$(cat pyproject.toml requirements/cpu.lock requirements/assets.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

# The labeling page's browser test drives Debian's chromium through its driver (nothing is downloaded by the test).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium and chromium-driver"
    apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }
  else
    echo "setup: chromium and chromium-driver are missing; the browser test needs them (apt-get install chromium chromium-driver)" >&2
  fi
fi

if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
uv=("$VENV/bin/uv" pip install --python "$VENV/bin/python" --compile-bytecode)

# The CPU torch wheel: from the local wheel folder where the machine has one, else PyTorch's CPU index.
if [ -d /opt/wheels ]; then
  torch_source=(--find-links /opt/wheels)
else
  torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi

echo "setup: installing locked dependencies into $VENV"
# The lock is complete (scripts/lock.sh): --no-deps keeps out what it leaves out on purpose (torchvision & co.).
"${uv[@]}" "${torch_source[@]}" --no-deps -r requirements/cpu.lock
# Every dependency comes from the lock above; the project itself is installed editable on top.
"${uv[@]}" --no-deps -e .
"${uv[@]}" --no-deps -r requirements/assets.txt

echo "$stamp" > "$VENV/.setup-stamp"
echo "setup: done"
