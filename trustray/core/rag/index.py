"""Dense passage index: FAISS inner product over normalised embeddings plus the passage table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.parquet"


@dataclass
class Passage:
    id: str
    title: str
    text: str
    score: float


class PassageIndex:
    """Exact inner-product search (`IndexFlatIP`) over passage vectors, with their ids, titles and texts."""

    def __init__(self, vectors: np.ndarray, ids: list[str], titles: list[str], texts: list[str]):
        import faiss

        if not (len(vectors) == len(ids) == len(titles) == len(texts)):
            raise ValueError("vectors, ids, titles and texts must have the same length")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.ids, self.titles, self.texts = list(ids), list(titles), list(texts)

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> list[list[Passage]]:
        """Top-k passages per query row, best first."""
        if k < 1:
            raise ValueError("k must be at least 1")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} does not match the index dimension {self.dim}")
        scores, rows = self.index.search(queries, min(k, len(self)))
        return [
            [Passage(self.ids[r], self.titles[r], self.texts[r], float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
            for srow, rrow in zip(scores, rows, strict=True)
        ]

    def save(self, folder: str | Path) -> None:
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        table = pa.table({"id": self.ids, "title": self.titles, "text": self.texts})
        pq.write_table(table, folder / PASSAGES_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> PassageIndex:
        import faiss
        import pyarrow.parquet as pq

        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file() or not (folder / PASSAGES_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a passage index (needs {INDEX_FILE} and {PASSAGES_FILE})")
        table = pq.read_table(folder / PASSAGES_FILE).to_pydict()
        index = cls.__new__(cls)
        index.index = faiss.read_index(str(folder / INDEX_FILE))
        index.ids, index.titles, index.texts = table["id"], table["title"], table["text"]
        if index.index.ntotal != len(index.ids):
            raise ValueError(f"{folder}: index holds {index.index.ntotal} vectors but {len(index.ids)} passages")
        return index
