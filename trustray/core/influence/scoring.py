"""Influence scoring and data selection (the LESS recipe): similarities, checkpoint weighting, task aggregation,
FAISS top-k search, and the selection file / subset export.

LESS scores a training example `z` for a target task as

    max over subtasks t of  mean over target examples z' in t of  sum over checkpoints i of  lr_i * cos(g_i(z), g_i(z'))

where `g_i` are the (projected) LoRA gradient features at warmup checkpoint `i`. The pieces here are kept
separate (`influence_scores` -> `combine_checkpoints` -> `aggregate_targets` -> `select_*`) so the evaluation can
score one checkpoint, one metric or one subtask at a time. Training features may be a single array or a list of
blocks (the feature store's memmapped shards): every function walks them chunk by chunk, so a pool of millions
of rows never needs a float32 copy in memory at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trustray.artifacts import atomic_write_text

Metric = Literal["cosine", "inner_product"]
IndexKind = Literal["flat", "ivf"]
SELECTION_KEYS = ("id", "score", "rank")
METRICS: tuple[str, ...] = ("cosine", "inner_product")
DEFAULT_CHUNK_ROWS = 65_536

Features = np.ndarray | Sequence[np.ndarray]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")


def _blocks(features: Features) -> list[np.ndarray]:
    """The training features as a list of 2-D blocks (one block for a plain array)."""
    blocks = [features] if isinstance(features, np.ndarray) else list(features)
    for block in blocks:
        if block.ndim != 2:
            raise ValueError(f"feature blocks must be 2-D [rows, dim], got shape {block.shape}")
    if len({block.shape[1] for block in blocks}) > 1:
        raise ValueError(f"feature blocks differ in dimension: {sorted({b.shape[1] for b in blocks})}")
    return blocks


def _chunks(features: Features, chunk_rows: int) -> Iterator[np.ndarray]:
    """float32 chunks of at most `chunk_rows` rows, in row order; only one chunk is materialised at a time."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for block in _blocks(features):
        for start in range(0, block.shape[0], chunk_rows):
            yield np.asarray(block[start : start + chunk_rows], dtype=np.float32)


def num_rows(features: Features) -> int:
    """Total number of rows over all blocks."""
    return sum(block.shape[0] for block in _blocks(features))


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; all-zero rows stay zero (cosine 0, not NaN, for an empty gradient)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def influence_scores(
    train: Features, targets: np.ndarray, metric: Metric = "cosine", chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> np.ndarray:
    """Similarity of every training row with every target row: float32 `[N, M]`.

    `cosine` is LESS's choice (it removes the bias towards short sequences, whose gradients have large norms);
    `inner_product` is the first-order TracIn-style score. `train` is consumed `chunk_rows` rows at a time.
    """
    _check_metric(metric)
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim != 2:
        raise ValueError(f"targets must be 2-D [M, dim], got shape {targets.shape}")
    blocks = _blocks(train)
    dim = blocks[0].shape[1] if blocks else targets.shape[1]
    if dim != targets.shape[1]:
        raise ValueError(f"training features have dimension {dim} but targets have {targets.shape[1]}")
    if metric == "cosine":
        targets = normalize_rows(targets)
    out = np.empty((num_rows(blocks), targets.shape[0]), dtype=np.float32)
    start = 0
    for chunk in _chunks(blocks, chunk_rows):
        if metric == "cosine":
            chunk = normalize_rows(chunk)
        out[start : start + len(chunk)] = chunk @ targets.T
        start += len(chunk)
    return out


def combine_checkpoints(
    scores_per_checkpoint: Sequence[np.ndarray], learning_rates: Sequence[float]
) -> np.ndarray:
    """`sum_i lr_i * score_i` over warmup checkpoints: float32, same shape as each score array.

    A checkpoint taken while the learning rate was high moved the model more, so its gradients count more.
    LESS's script divides the weights by their sum first; that only rescales all scores and leaves rankings and
    selections unchanged, so the raw learning rates are used here.
    """
    if len(scores_per_checkpoint) != len(learning_rates):
        raise ValueError(
            f"got {len(scores_per_checkpoint)} score arrays but {len(learning_rates)} learning rates; "
            "give one learning rate per checkpoint"
        )
    if not scores_per_checkpoint:
        raise ValueError("no checkpoints to combine")
    rates = [float(lr) for lr in learning_rates]
    bad = [lr for lr in rates if not math.isfinite(lr) or lr < 0]
    if bad:
        raise ValueError(f"learning rates must be finite and non-negative, got {bad}")
    shape = np.shape(scores_per_checkpoint[0])
    combined = np.zeros(shape, dtype=np.float32)
    for number, (scores, lr) in enumerate(zip(scores_per_checkpoint, rates, strict=True)):
        if np.shape(scores) != shape:
            raise ValueError(f"checkpoint {number} scores have shape {np.shape(scores)}, expected {shape}")
        combined += np.float32(lr) * np.asarray(scores, dtype=np.float32)
    return combined


def task_groups(target_task: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
    """Column indices of each target subtask, in order of first appearance."""
    names = [str(name) for name in np.asarray(target_task).tolist()]
    groups: dict[str, list[int]] = {}
    for column, name in enumerate(names):
        groups.setdefault(name, []).append(column)
    return {name: np.asarray(columns, dtype=np.int64) for name, columns in groups.items()}


def aggregate_targets(scores: np.ndarray, target_task: Sequence[str] | np.ndarray) -> np.ndarray:
    """LESS's task score per training row: max over subtasks of the mean over that subtask's target columns.

    Averaging within a subtask stops a subtask with many target examples from dominating; the max keeps an
    example that helps any one subtask strongly. Returns float32 `[N]`.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, M], got shape {scores.shape}")
    if len(target_task) != scores.shape[1]:
        raise ValueError(f"target_task names {len(target_task)} columns but scores have {scores.shape[1]}")
    if scores.shape[1] == 0:
        raise ValueError("scores have no target columns")
    per_task = [scores[:, columns].mean(axis=1) for columns in task_groups(target_task).values()]
    return np.max(np.stack(per_task, axis=1), axis=1).astype(np.float32, copy=False)


def task_queries(
    targets: np.ndarray, target_task: Sequence[str] | np.ndarray, metric: Metric = "cosine"
) -> tuple[list[str], np.ndarray]:
    """One query vector per target subtask: `(task names, [T, dim])`, the mean of its (normalised) targets.

    The score is linear in the target, so a training row's inner product with this query equals the mean of
    its scores over the subtask's targets: a `TopKIndex` searched with these queries (and
    `normalize_queries=False`) gives LESS's per-subtask
    scores for the best rows without scoring the whole `[N, M]` matrix.
    """
    _check_metric(metric)
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim != 2 or len(target_task) != targets.shape[0]:
        raise ValueError(
            f"need one task name per target row: {len(target_task)} names, targets {targets.shape}"
        )
    if metric == "cosine":
        targets = normalize_rows(targets)
    groups = task_groups(target_task)
    return list(groups), np.stack([targets[rows].mean(axis=0) for rows in groups.values()])


class TopKIndex:
    """FAISS inner-product index over training features, for top-k training rows per target query.

    `flat` is exact; `ivf` (inverted lists, `nlist` clusters trained on the features, `nprobe` searched) trades a
    little recall for speed on large pools and is exact when `nprobe == nlist`. For `cosine`, training rows and
    queries are L2-normalised so the inner product is the cosine. Rows are added `chunk_rows` at a time from the
    (possibly memmapped, float16) blocks.
    """

    def __init__(
        self,
        features: Features,
        metric: Metric = "cosine",
        kind: IndexKind = "flat",
        nlist: int = 1024,
        nprobe: int = 16,
        train_rows: int | None = None,
        seed: int = 0,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ):
        import faiss

        _check_metric(metric)
        blocks = _blocks(features)
        total = num_rows(blocks)
        if total == 0:
            raise ValueError("cannot index zero training rows")
        dim = blocks[0].shape[1]
        self.metric = metric
        self.kind = kind
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            if not 1 <= nlist <= total:
                raise ValueError(f"nlist must be between 1 and the number of rows ({total}), got {nlist}")
            if not 1 <= nprobe <= nlist:
                raise ValueError(f"nprobe must be between 1 and nlist ({nlist}), got {nprobe}")
            self._quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(self._training_sample(blocks, total, train_rows, seed))
            self.index.nprobe = nprobe
        else:
            raise ValueError(f"unknown index kind {kind!r}; choose 'flat' or 'ivf'")
        for chunk in _chunks(blocks, chunk_rows):
            self.index.add(self._prepare(chunk))

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = normalize_rows(x) if self.metric == "cosine" else np.asarray(x, dtype=np.float32)
        return np.ascontiguousarray(x)

    def _training_sample(
        self, blocks: list[np.ndarray], total: int, train_rows: int | None, seed: int
    ) -> np.ndarray:
        """The rows k-means trains the IVF cells on: all rows, or a seeded random subset of `train_rows`."""
        if train_rows is None or train_rows >= total:
            return np.concatenate([self._prepare(chunk) for chunk in _chunks(blocks, DEFAULT_CHUNK_ROWS)])
        picked = np.sort(np.random.default_rng(seed).choice(total, size=train_rows, replace=False))
        rows: list[np.ndarray] = []
        offset = 0
        for block in blocks:
            local = picked[(picked >= offset) & (picked < offset + block.shape[0])] - offset
            if len(local):
                rows.append(self._prepare(block[local]))
            offset += block.shape[0]
        return np.concatenate(rows)

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def search(
        self, queries: np.ndarray, k: int, normalize_queries: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k training rows per query, best first: `(scores [M, k] float32, row_indices [M, k] int64)`.

        Queries are L2-normalised for `cosine` unless `normalize_queries=False`, which `task_queries` outputs
        need (a mean of unit vectors must keep its length for the score to be the mean cosine). `k` is capped at
        the number of rows; with IVF a cell shortage can leave trailing entries as row -1.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"query dimension {queries.shape[1]} does not match the index dimension {self.dim}"
            )
        if normalize_queries is None:
            normalize_queries = self.metric == "cosine"
        queries = normalize_rows(queries) if normalize_queries else queries
        scores, rows = self.index.search(np.ascontiguousarray(queries), min(k, len(self)))
        return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)


def _ranked_order(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top `k` scores, by score descending then id ascending (deterministic under ties)."""
    if k < len(scores):
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.flatnonzero(scores >= threshold)
    else:
        candidates = np.arange(len(scores))
    order = np.lexsort((ids[candidates], -scores[candidates]))
    return candidates[order[:k]]


def select_top_k(scores: np.ndarray, ids: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The `k` best training examples as rows `{id, score, rank}` (rank 1 is the best), score descending.

    Ties are broken by id ascending, so the selection does not depend on the order shards were written in.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(ids):
        raise ValueError(f"got {len(scores)} scores but {len(ids)} ids")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} scores are NaN or infinite; cannot rank them")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    id_array = np.asarray([str(i) for i in ids])
    if len(set(id_array.tolist())) != len(id_array):
        raise ValueError("ids must be unique to select by them")
    k = min(k, len(scores))
    if k == 0:
        return []
    chosen = _ranked_order(scores, id_array, k)
    return [
        {"id": str(id_array[row]), "score": float(scores[row]), "rank": rank}
        for rank, row in enumerate(chosen.tolist(), start=1)
    ]


def fraction_count(total: int, fraction: float) -> int:
    """How many examples a top-`fraction` selection keeps: `floor(fraction * total)` as in LESS, at least 1.

    A tiny tolerance absorbs float error (`0.29 * 100` is `28.999...`, which must give 29).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if total <= 0:
        return 0
    return max(1, min(total, math.floor(fraction * total + 1e-9)))


def select_top_fraction(scores: np.ndarray, ids: Sequence[str], fraction: float) -> list[dict[str, Any]]:
    """The best `fraction` of the pool (0.05 for LESS's top 5%); see `fraction_count` for the rounding."""
    return select_top_k(scores, ids, fraction_count(len(ids), fraction))


def _write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """JSONL that appears whole or not at all (`trustray.data.io` is above `core`, so not imported here)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows))
    return path


def write_selection(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """The selection as JSONL `{id, score, rank}` per line, written atomically (a reader never sees half a file)."""
    for number, row in enumerate(rows):
        missing = [key for key in SELECTION_KEYS if key not in row]
        if missing:
            raise ValueError(f"selection row {number} lacks {missing}")
    return _write_jsonl(
        ({"id": str(row["id"]), "score": float(row["score"]), "rank": int(row["rank"])} for row in rows), path
    )


def export_subset(
    selection_rows: Sequence[Mapping[str, Any]], pool_rows: Sequence[Mapping[str, Any]], path: str | Path
) -> Path:
    """Write the selected training examples (the full original pool rows, in rank order) as JSONL.

    The output is directly a training file for the final fine-tune; every selected id must be in the pool.
    """
    by_id: dict[str, Mapping[str, Any]] = {}
    for row in pool_rows:
        key = str(row["id"])
        if key in by_id:
            raise ValueError(f"pool has duplicate id {key!r}")
        by_id[key] = row
    ordered = sorted(selection_rows, key=lambda row: int(row["rank"]))
    missing = [str(row["id"]) for row in ordered if str(row["id"]) not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} selected ids are not in the pool, e.g. {missing[:5]}")
    return _write_jsonl((by_id[str(row["id"])] for row in ordered), path)
