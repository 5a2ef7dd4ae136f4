#!/usr/bin/env bash
# Prove the `gpu` extra (vLLM, faiss-gpu-cu12) resolves together with the base dependencies for
# linux x86_64: a metadata-only resolution, nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-.venv/bin/uv}
out=$(mktemp)
"$uv" pip compile pyproject.toml --extra gpu --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --no-header --no-annotate -o "$out" --quiet
grep -E '^(vllm|torch|transformers|ray|faiss-gpu-cu12)==' "$out"
rm -f "$out"
