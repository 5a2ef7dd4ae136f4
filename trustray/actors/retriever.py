"""`Retriever`: a built passage index plus the embedder that made it; `RetrieverActor` is its Ray actor."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import ray

from trustray.artifacts import ArtifactMismatchError, read_metadata
from trustray.core.rag.index import Passage, PassageIndex
from trustray.models.embedders import Embedder, EmbedderConfig

logger = logging.getLogger(__name__)


def index_metadata(index_dir: str | Path) -> dict[str, Any]:
    """The metadata of a finished passage index (one that records the fingerprint of the embedder that built it)."""
    metadata = read_metadata(index_dir)
    if metadata is None or "embedder_fingerprint" not in metadata:
        raise FileNotFoundError(
            f"{index_dir} is not a finished passage index (no metadata.json with an embedder fingerprint); "
            f"build one with `python -m trustray.pipelines.build_index`"
        )
    return metadata


def check_index_embedder(index_dir: str | Path, embedder_model: str, fingerprint: str) -> None:
    """Refuse an index built by another embedder than `embedder_model` (weights `fingerprint`): its vectors and
    the question vectors would lie in different spaces and retrieval would return noise."""
    metadata = index_metadata(index_dir)
    if metadata["embedder_fingerprint"] != fingerprint:
        raise ArtifactMismatchError(
            f"index at {index_dir} was embedded with {metadata.get('embedder', 'an unrecorded embedder')!r} "
            f"(fingerprint {metadata['embedder_fingerprint']}), but the retriever's embedder "
            f"{embedder_model!r} has fingerprint {fingerprint}; use the same embedder or rebuild the index"
        )


class Retriever:
    """Dense top-k retrieval over an index folder written by `trustray.pipelines.build_index`.

    Without `embedder_config`, the embedder recorded in the index metadata is used.
    """

    def __init__(self, index_dir: str | Path, embedder_config: EmbedderConfig | None = None):
        if embedder_config is None:
            metadata = index_metadata(index_dir)
            embedder_config = EmbedderConfig(model=metadata["embedder"], normalize=metadata["normalize"],
                                             backend=metadata.get("embedder_backend", "torch"))
        self.embedder = Embedder(embedder_config)
        check_index_embedder(index_dir, embedder_config.model, self.embedder.fingerprint)
        self.index = PassageIndex.load(index_dir)
        if self.index.dim != self.embedder.dim:
            raise ArtifactMismatchError(
                f"index at {index_dir} holds {self.index.dim}-dim vectors but the embedder makes "
                f"{self.embedder.dim}-dim ones"
            )
        logger.info("retriever ready: %d passages from %s", len(self.index), index_dir)

    def retrieve(self, questions: list[str], k: int = 5) -> list[list[Passage]]:
        """Top-k passages for each question, best first."""
        if not questions:
            return []
        return self.index.search(self.embedder.encode(questions), k)

    def random_passages(self, count: int, seed: int = 0) -> list[Passage]:
        """Up to `count` distinct passages of the index drawn at random (seeded; score 0): distractors for
        robustness runs."""
        rows = random.Random(seed).sample(range(len(self.index)), min(count, len(self.index)))
        index = self.index
        return [Passage(index.ids[r], index.titles[r], index.texts[r], 0.0) for r in rows]


RetrieverActor = ray.remote(Retriever)
