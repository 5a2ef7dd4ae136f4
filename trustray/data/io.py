"""Row-file helpers shared by the loaders: JSONL and Parquet in, atomic JSONL out."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trustray.artifacts import atomic_write_text

JSONL_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line; the file appears whole or not at all."""
    path = Path(path)
    text = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(path, text)
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of dicts; a bad line is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Read rows from a JSONL (`.jsonl`/`.json`, one object per line) or Parquet (`.parquet`/`.pq`) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as error:
            raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
    raise ValueError(
        f"{path}: unsupported file type {suffix or '(none)'!r}; "
        f"use JSONL ({', '.join(sorted(JSONL_SUFFIXES))}) or Parquet ({', '.join(sorted(PARQUET_SUFFIXES))})"
    )


def require_columns(rows: list[dict[str, Any]], required: Iterable[str], source: str) -> None:
    """Raise naming the first row that lacks a required field (or has it empty/null)."""
    required = list(required)
    if not rows:
        raise ValueError(f"{source}: no rows")
    for number, row in enumerate(rows):
        missing = [key for key in required if row.get(key) in (None, "")]
        if missing:
            raise ValueError(
                f"{source}: row {number} lacks required field(s) {missing}; required: {required}, "
                f"found: {sorted(row)}"
            )
