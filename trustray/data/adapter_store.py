"""Published LoRA adapters: how a newly trained policy reaches the serving chat deployment without a restart.

`<store_dir>/<name>/versions/<version>/` holds one adapter (peft's files only), `<store_dir>/<name>/current.json`
names the version served as the model `<name>`. `publish` writes the version folder first and then replaces
`current.json` atomically, so a reader sees the old version or the new one, never a half-written one. The version is
the adapter weights' sha256 (12 hex digits): publishing the same weights twice is a no-op. Old versions stay on disk
(a request that read the old pointer just before a swap still finds its files).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from trustray.artifacts import atomic_folder, atomic_write_text

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def publish(store_dir: str | Path, name: str, adapter_dir: str | Path) -> str:
    """Make `adapter_dir` the adapter served as `name`; returns its version."""
    if not NAME.match(name):
        raise ValueError(f"adapter name {name!r}: letters, digits, '.', '_' and '-', at most 64 characters")
    adapter_dir = Path(adapter_dir)
    missing = [file for file in ADAPTER_FILES if not (adapter_dir / file).is_file()]
    if missing:
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter folder (missing {', '.join(missing)})")
    version = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    root = Path(store_dir) / name
    target = root / "versions" / version
    if not target.is_dir():
        with atomic_folder(target) as tmp:
            for file in ADAPTER_FILES:
                shutil.copy(adapter_dir / file, tmp / file)
    atomic_write_text(root / "current.json", json.dumps({"version": version, "published": time.time()}))
    return version


def current(store_dir: str | Path, name: str) -> tuple[str, Path] | None:
    """(version, folder) of the adapter served as `name`, or None when there is none."""
    if not NAME.match(name):
        return None
    pointer = Path(store_dir) / name / "current.json"
    if not pointer.is_file():
        return None
    version = json.loads(pointer.read_text())["version"]
    return version, Path(store_dir) / name / "versions" / version


def names(store_dir: str | Path) -> list[str]:
    """Every adapter name with a published version."""
    root = Path(store_dir)
    return sorted(path.parent.name for path in root.glob("*/current.json")) if root.is_dir() else []
