"""Self-describing artifact folders: contents plus `metadata.json`, written atomically, checked on reuse."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

METADATA_FILE = "metadata.json"


class ArtifactMismatchError(ValueError):
    """An existing artifact was made with other settings than the ones asked for."""


def read_metadata(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_artifact(folder: str | Path, kind: str, what: str, hint: str = "") -> dict[str, Any]:
    """The metadata of the finished artifact of `kind` in `folder`; `FileNotFoundError` naming `what` (plus `hint`,
    e.g. the command that makes one) when the folder holds none."""
    metadata = read_metadata(folder)
    if metadata is None or metadata.get("kind") != kind:
        raise FileNotFoundError(f"{folder} holds no {what} (no metadata.json of kind {kind!r}){hint}")
    return metadata


def check_metadata(folder: str | Path, expected: Mapping[str, Any], kind: str = "artifact") -> bool:
    """True when `folder` holds a finished artifact whose metadata agrees with `expected` on every key given.

    False when there is no finished artifact; `ArtifactMismatchError` naming the differing keys when there is
    one made with other settings (reusing it silently would mix results of different configurations).
    """
    found = read_metadata(folder)
    if found is None:
        return False
    differing = {key: (found.get(key), value) for key, value in expected.items() if found.get(key) != value}
    if differing:
        detail = "; ".join(f"{key}: found {old!r}, asked {new!r}" for key, (old, new) in sorted(differing.items()))
        raise ArtifactMismatchError(
            f"{kind} at {folder} was made with other settings ({detail}). "
            f"Choose another output folder or delete it to rebuild."
        )
    return True


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` in one rename, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_metadata(folder: str | Path, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Write `metadata.json` (with a creation time) into `folder`; returns what was written."""
    record = {**metadata, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(Path(folder) / METADATA_FILE, json.dumps(record, indent=2, sort_keys=True, default=str))
    return record


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class TensorFiles(MutableMapping[str, Any]):
    """A folder of values saved with `torch.save`, one file per key, each written atomically: a cache of per-record
    work that survives a crash. Keys are file-name safe (letters, digits, `-`, `_`)."""

    KEY = re.compile(r"[A-Za-z0-9_-]+")

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)  # made by the first write

    def _path(self, key: str) -> Path:
        if not self.KEY.fullmatch(key):
            raise KeyError(f"not a file-name safe key: {key!r}")
        return self.folder / f"{key}.pt"

    def __getitem__(self, key: str) -> Any:
        import torch

        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        return torch.load(path, weights_only=True)

    def __setitem__(self, key: str, value: Any) -> None:
        import torch

        path = self._path(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, path)

    def __delitem__(self, key: str) -> None:
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        path.unlink()

    def __iter__(self) -> Iterator[str]:
        return (path.stem for path in sorted(self.folder.glob("*.pt")))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.pt"))
