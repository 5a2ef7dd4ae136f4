"""Lexical retrieval (BM25, via `bm25s`) and reciprocal-rank fusion with dense results.

Measured against the dense index on the RAG evaluation set (`benchmarks/retrieval_recall.py`), neither raised
recall@5, so neither is an index option yet; they are kept to measure that against new corpora and embedders.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Cormack et al. (2009): the constant that damps the weight of the very first ranks.
RRF_CONSTANT = 60


class LexicalIndex:
    """BM25 (Lucene's variant, English stopwords removed, no stemming) over `title\\ntext` of each passage."""

    def __init__(self, ids: Sequence[str], titles: Sequence[str], texts: Sequence[str]):
        import bm25s

        if not (len(ids) == len(titles) == len(texts)) or not ids:
            raise ValueError("ids, titles and texts must be non-empty and of the same length")
        self.ids = list(ids)
        self.model = bm25s.BM25()
        self.model.index(self._tokenize([f"{title}\n{text}" for title, text in zip(titles, texts, strict=True)]),
                         show_progress=False)

    @staticmethod
    def _tokenize(texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Top-k `(passage id, BM25 score)` per query, best first; a query with no indexed word gets none."""
        if k < 1:
            raise ValueError("k must be at least 1")
        k = min(k, len(self.ids))
        tokens = self._tokenize(queries)
        found: list[list[tuple[str, float]]] = [[] for _ in queries]
        asked = [i for i, words in enumerate(tokens) if any(w in self.model.vocab_dict for w in words)]
        if asked:
            rows, scores = self.model.retrieve([tokens[i] for i in asked], k=k, show_progress=False, n_threads=0)
            for i, row_ids, row_scores in zip(asked, np.atleast_2d(rows), np.atleast_2d(scores), strict=True):
                found[i] = [(self.ids[r], float(s)) for r, s in zip(row_ids, row_scores, strict=True) if s > 0]
        return found


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], k: int, constant: int = RRF_CONSTANT) -> list[str]:
    """The top k ids by Σ 1 / (constant + rank) over the rankings (rank from 1); ties keep first-seen order."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (constant + rank)
    return sorted(scores, key=lambda item: -scores[item])[:k]
