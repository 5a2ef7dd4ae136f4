"""Gradient-feature store: a self-describing folder of sharded `.npy` feature matrices keyed by example id.

Layout of a store folder:

    metadata.json                 settings the features were made with (+ dim, dtype; num_examples, finished)
    shard-00007.npy               float16/float32 [rows, dim] features of shard 7
    shard-00007.ids.parquet       the example ids of those rows, in row order
    index.parquet                 (id, shard, row) over all finished shards, built by `index_table`/`finalize`

Why it is built this way: the feature stage runs for hours over millions of examples on many workers, any of
which can be killed. Each shard is written to a temporary name and renamed into place (a rename is atomic), the
features first and the ids last, and a shard counts as finished only when both files exist. A crash therefore
leaves either nothing visible or a features file without ids, which `finished_shards` does not count and a
resumed job simply rewrites. `metadata.json` is checked on reopen so a store made with another model, LoRA
configuration or reduction is refused instead of silently mixing incompatible features.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trustray.artifacts import (
    METADATA_FILE,
    ArtifactMismatchError,
    atomic_write_text,
    check_metadata,
    read_metadata,
    write_metadata,
)

if TYPE_CHECKING:
    import pyarrow as pa

DTYPES: tuple[str, ...] = ("float16", "float32")
INDEX_FILE = "index.parquet"
STORE_FORMAT = "trustray-feature-store/1"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.ids\.parquet$")
TEMP_MARKER = ".tmp-"


def shard_stem(shard_index: int) -> str:
    return f"shard-{shard_index:05d}"


def _temp_path(path: Path) -> Path:
    """A sibling name unique to this process and call, so concurrent writers of one shard never collide."""
    return path.with_name(f"{path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_replace(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk, then rename it over `path`, so a crash never exposes a renamed but empty file."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class FeatureStore:
    """One feature store folder; create or reopen it with `FeatureStore.create_or_open`."""

    def __init__(self, folder: Path, metadata: dict[str, Any]):
        self.folder = folder
        self.metadata = metadata
        self.dim = int(metadata["dim"])
        self.dtype = str(metadata["dtype"])
        self._lookup: tuple[frozenset[int], dict[str, tuple[int, int]]] | None = None

    @classmethod
    def create_or_open(
        cls, folder: str | Path, metadata: Mapping[str, Any], dim: int, dtype: str = "float16"
    ) -> FeatureStore:
        """Open the store at `folder`, creating it when absent.

        `metadata` should name everything the features depend on (model hash, LoRA config, reduction and its
        seed or basis hash, checkpoint). A new folder records it with `dim` and `dtype`; an existing one must
        agree on every one of those keys, else `ArtifactMismatchError` names the keys that differ.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        reserved = {"dim", "dtype", "format", "finished", "num_examples", "created_at"} & set(metadata)
        if reserved:
            raise ValueError(f"metadata keys {sorted(reserved)} are set by the feature store itself")
        folder = Path(folder)
        # Compare as JSON would store it (tuples become lists), so reopening with the same settings always matches.
        expected = json.loads(
            json.dumps({**metadata, "format": STORE_FORMAT, "dim": int(dim), "dtype": dtype}, default=str)
        )
        if check_metadata(folder, expected, kind="feature store"):
            return cls(folder, read_metadata(folder) or {})
        if folder.is_dir() and any(
            SHARD_PATTERN.match(p.name) or p.suffix == ".npy" for p in folder.iterdir()
        ):
            raise ArtifactMismatchError(
                f"{folder} holds shard files but no metadata.json, so the settings they were made with are "
                "unknown. Choose another output folder or delete it to rebuild."
            )
        folder.mkdir(parents=True, exist_ok=True)
        record = write_metadata(folder, {**expected, "finished": False})
        return cls(folder, record)

    @property
    def finished(self) -> bool:
        """True once `finalize` has checked the ids and written the index."""
        return bool(self.metadata.get("finished"))

    def _features_path(self, shard_index: int) -> Path:
        return self.folder / f"{shard_stem(shard_index)}.npy"

    def _ids_path(self, shard_index: int) -> Path:
        return self.folder / f"{shard_stem(shard_index)}.ids.parquet"

    def is_finished(self, shard_index: int) -> bool:
        """Both files of the shard are in place (a features file alone is a write that was interrupted)."""
        return self._ids_path(shard_index).is_file() and self._features_path(shard_index).is_file()

    def finished_shards(self) -> set[int]:
        """Indices of the finished shards; a resumed job skips these."""
        found = set()
        for path in self.folder.iterdir():
            match = SHARD_PATTERN.match(path.name)
            if match and self._features_path(int(match.group(1))).is_file():
                found.add(int(match.group(1)))
        return found

    def shard_ids(self, shard_index: int) -> list[str]:
        """The example ids of one finished shard, in row order."""
        import pyarrow.parquet as pq

        if not self.is_finished(shard_index):
            raise FileNotFoundError(f"shard {shard_index} of {self.folder} is not finished")
        return [str(value) for value in pq.read_table(self._ids_path(shard_index)).column("id").to_pylist()]

    def shard_features(self, shard_index: int, mmap: bool = True) -> np.ndarray:
        """The features of one finished shard: a read-only memmap (`mmap=True`) or an in-memory array."""
        if not self.is_finished(shard_index):
            raise FileNotFoundError(f"shard {shard_index} of {self.folder} is not finished")
        return np.load(self._features_path(shard_index), mmap_mode="r" if mmap else None)

    def write_shard(self, shard_index: int, ids: Sequence[str], features: np.ndarray) -> bool:
        """Write shard `shard_index` atomically; True when written, False when it was already finished.

        Idempotent: a finished shard with the same ids is left as it is (a retried task is harmless); with other
        ids it is an error, because two workers disagreeing about a shard's contents is a partitioning bug.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if shard_index < 0:
            raise ValueError(f"shard_index must be >= 0, got {shard_index}")
        ids = [str(value) for value in ids]
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"shard {shard_index}: features must have shape [n, {self.dim}], got {features.shape}"
            )
        if features.shape[0] != len(ids):
            raise ValueError(f"shard {shard_index}: {len(ids)} ids but {features.shape[0]} feature rows")
        if len(set(ids)) != len(ids):
            raise ValueError(f"shard {shard_index}: ids repeat within the shard")
        if self.is_finished(shard_index):
            existing = self.shard_ids(shard_index)
            if existing != ids:
                raise ValueError(
                    f"shard {shard_index} of {self.folder} is already finished with other ids "
                    f"({len(existing)} rows, first {existing[:3]}); refusing to overwrite it"
                )
            return False
        if self.finished:
            raise ValueError(f"{self.folder} is finalized; refusing to add shard {shard_index}")
        stored = features.astype(self.dtype, copy=False)
        if not np.all(np.isfinite(stored)):
            raise ValueError(
                f"shard {shard_index}: features are not finite as {self.dtype} "
                "(NaN in the gradients, or values beyond the float16 range)"
            )
        features_path = self._features_path(shard_index)
        tmp = _temp_path(features_path)
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(stored))
        _fsync_replace(tmp, features_path)
        ids_path = self._ids_path(shard_index)
        tmp = _temp_path(ids_path)
        pq.write_table(pa.table({"id": pa.array(ids, type=pa.string())}), tmp)
        _fsync_replace(tmp, ids_path)
        return True

    def load_blocks(self, mmap: bool = True) -> tuple[list[str], list[np.ndarray]]:
        """All finished shards in shard order: `(ids, [features of each shard])`, without copying.

        With `mmap=True` each block is a read-only memmap, so a pool larger than memory can be streamed;
        `scoring.influence_scores` and `scoring.TopKIndex` take the list of blocks as it is.
        """
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        for shard_index in sorted(self.finished_shards()):
            shard_ids = self.shard_ids(shard_index)
            block = self.shard_features(shard_index, mmap=mmap)
            if block.shape != (len(shard_ids), self.dim):
                raise ValueError(
                    f"shard {shard_index} of {self.folder} is inconsistent: features {block.shape} "
                    f"for {len(shard_ids)} ids of dimension {self.dim}; delete both shard files to redo it"
                )
            ids.extend(shard_ids)
            blocks.append(block)
        return ids, blocks

    def load(self, mmap: bool = True) -> tuple[list[str], np.ndarray]:
        """All finished shards as one `[N, dim]` array in shard order, with the ids of its rows.

        A single shard comes back as its memmap (no copy); several are concatenated into memory, which copies
        them, so use `load_blocks` to stream a large pool instead.
        """
        ids, blocks = self.load_blocks(mmap=mmap)
        if not blocks:
            return ids, np.empty((0, self.dim), dtype=self.dtype)
        if len(blocks) == 1:
            return ids, blocks[0]
        return ids, np.concatenate(blocks)

    def ids(self) -> list[str]:
        """The ids of all finished shards, in shard and row order."""
        ids: list[str] = []
        for shard_index in sorted(self.finished_shards()):
            ids.extend(self.shard_ids(shard_index))
        return ids

    def index_table(self) -> pa.Table:
        """Build (or refresh) `index.parquet`: one row `(id, shard, row)` per example of every finished shard.

        Rebuilt from the shards' id files on every call, so it can never describe shards that changed since;
        returns the `pyarrow.Table` written.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids: list[str] = []
        shards: list[int] = []
        rows: list[int] = []
        for shard_index in sorted(self.finished_shards()):
            shard_ids = self.shard_ids(shard_index)
            ids.extend(shard_ids)
            shards.extend([shard_index] * len(shard_ids))
            rows.extend(range(len(shard_ids)))
        table = pa.table(
            {
                "id": pa.array(ids, type=pa.string()),
                "shard": pa.array(shards, type=pa.int32()),
                "row": pa.array(rows, type=pa.int64()),
            }
        )
        path = self.folder / INDEX_FILE
        tmp = _temp_path(path)
        pq.write_table(table, tmp)
        _fsync_replace(tmp, path)
        return table

    def _id_lookup(self) -> dict[str, tuple[int, int]]:
        """id -> (shard, row), cached until the set of finished shards changes."""
        shards = frozenset(self.finished_shards())
        if self._lookup is None or self._lookup[0] != shards:
            lookup: dict[str, tuple[int, int]] = {}
            for shard_index in sorted(shards):
                for row, example_id in enumerate(self.shard_ids(shard_index)):
                    lookup.setdefault(example_id, (shard_index, row))
            self._lookup = (shards, lookup)
        return self._lookup[1]

    def features_for(self, ids: Iterable[str]) -> np.ndarray:
        """Features of the given example ids, in the order asked, as an in-memory `[len(ids), dim]` array."""
        wanted = [str(value) for value in ids]
        lookup = self._id_lookup()
        missing = [value for value in wanted if value not in lookup]
        if missing:
            raise KeyError(
                f"{len(missing)} ids are not in the feature store {self.folder}, e.g. {missing[:5]}"
            )
        out = np.empty((len(wanted), self.dim), dtype=self.dtype)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for position, value in enumerate(wanted):
            shard_index, row = lookup[value]
            by_shard.setdefault(shard_index, []).append((position, row))
        for shard_index, pairs in by_shard.items():
            block = self.shard_features(shard_index)
            positions, rows = (np.asarray(column) for column in zip(*pairs, strict=True))
            out[positions] = block[rows]
        return out

    def remove_temp_files(self) -> int:
        """Delete temporary files that killed writers left behind; only safe once no writer is running."""
        removed = 0
        for path in self.folder.iterdir():
            if TEMP_MARKER in path.name and path.name.startswith(("shard-", "index.parquet")):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def finalize(self, expected_count: int, expected_ids: Iterable[str] | None = None) -> dict[str, Any]:
        """Check the store is complete and consistent, write `index.parquet`, and mark the metadata finished.

        Every example id must appear exactly once across the finished shards and there must be
        `expected_count` of them (and exactly `expected_ids`, when given); otherwise a `ValueError` says which
        ids repeat or are missing. Leftover temporary files of killed writers are removed. Returns the metadata.
        """
        table = self.index_table()
        ids = [str(value) for value in table.column("id").to_pylist()]
        shards = table.column("shard").to_pylist()
        first_shard: dict[str, int] = {}
        duplicates: dict[str, list[int]] = {}
        for example_id, shard_index in zip(ids, shards, strict=True):
            if example_id in first_shard:
                duplicates.setdefault(example_id, [first_shard[example_id]]).append(shard_index)
            else:
                first_shard[example_id] = shard_index
        if duplicates:
            shown = "; ".join(f"{key!r} in shards {value}" for key, value in list(duplicates.items())[:5])
            raise ValueError(f"{self.folder}: {len(duplicates)} ids appear more than once ({shown})")
        if expected_ids is not None:
            expected = {str(value) for value in expected_ids}
            missing = sorted(expected - first_shard.keys())
            unexpected = sorted(first_shard.keys() - expected)
            if missing or unexpected:
                raise ValueError(
                    f"{self.folder}: {len(missing)} expected ids are missing (e.g. {missing[:5]}) and "
                    f"{len(unexpected)} ids were not expected (e.g. {unexpected[:5]})"
                )
        if len(ids) != expected_count:
            finished = sorted(self.finished_shards())
            gaps = sorted(set(range(finished[-1] + 1)) - set(finished)) if finished else []
            raise ValueError(
                f"{self.folder}: {len(ids)} examples in {len(finished)} finished shards, expected "
                f"{expected_count}; unfinished shard indices below the last: {gaps[:20]}"
            )
        self.remove_temp_files()
        record = {**(read_metadata(self.folder) or self.metadata), "num_examples": len(ids), "finished": True}
        atomic_write_text(
            self.folder / METADATA_FILE, json.dumps(record, indent=2, sort_keys=True, default=str)
        )
        self.metadata = record
        return record
