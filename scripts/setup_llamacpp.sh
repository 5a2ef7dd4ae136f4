#!/usr/bin/env bash
# Set up .venv-llamacpp: llama.cpp's OpenAI-compatible server (llama-cpp-python[server], from
# requirements/llamacpp.lock), the system benchmarks/cpu_serving.py compares trustray's serving against. PyPI ships
# it as source: llama.cpp is compiled here with the machine's cmake and compiler (several minutes on two cores).
# A rerun with an unchanged lock does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TRUSTRAY_LLAMACPP_VENV:-.venv-llamacpp}
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9
stamp=$(cat requirements/llamacpp.lock scripts/setup_llamacpp.sh | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ]; then
  echo "setup_llamacpp: $VENV is up to date"
  exit 0
fi
command -v cmake >/dev/null && command -v g++ >/dev/null \
  || { echo "setup_llamacpp: cmake and a C++ compiler are needed to build llama.cpp" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
echo "setup_llamacpp: building llama.cpp into $VENV (compiles from source)"
# An AVX2 build, not the default native one: built natively on a CPU with AVX-512 and AMX, llama.cpp 0.3.36
# segfaulted on the first token of the packaged Q4_1 model; AVX2 runs on every machine this project uses.
CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"} \
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps --reinstall --no-cache \
  -r requirements/llamacpp.lock
echo "$stamp" > "$VENV/.setup-stamp"
echo "setup_llamacpp: done"
