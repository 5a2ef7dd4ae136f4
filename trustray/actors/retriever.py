"""`Retriever`: a built passage index plus the embedder that made it; `RetrieverActor` is its Ray actor."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import ray

from trustray.artifacts import ArtifactMismatchError, read_metadata
from trustray.config import ActorResources
from trustray.core.rag.index import Passage, PassageIndex
from trustray.models.embedders import Embedder, EmbedderConfig

logger = logging.getLogger(__name__)


class Retriever:
    """Dense top-k retrieval over an index folder written by `trustray.pipelines.build_index`.

    Without `embedder_config`, the embedder recorded in the index metadata is used. Queries must be embedded
    by the same weights as the passages, so a fingerprint mismatch is refused rather than returning noise.
    """

    def __init__(self, index_dir: str | Path, embedder_config: EmbedderConfig | None = None):
        index_dir = Path(index_dir)
        metadata = read_metadata(index_dir)
        if metadata is None or "embedder_fingerprint" not in metadata:
            raise FileNotFoundError(
                f"{index_dir} is not a finished passage index (no metadata.json with an embedder fingerprint); "
                f"build one with `python -m trustray.pipelines.build_index`"
            )
        if embedder_config is None:
            embedder_config = EmbedderConfig(model=metadata["embedder"], normalize=metadata["normalize"])
        self.embedder = Embedder(embedder_config)
        if self.embedder.fingerprint != metadata["embedder_fingerprint"]:
            raise ArtifactMismatchError(
                f"index at {index_dir} was embedded with {metadata['embedder']!r} "
                f"(fingerprint {metadata['embedder_fingerprint']}), but the retriever's embedder "
                f"{embedder_config.model!r} has fingerprint {self.embedder.fingerprint}; "
                f"use the same embedder or rebuild the index"
            )
        self.index = PassageIndex.load(index_dir)
        self.metadata = metadata
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


def start_retriever_actor(
    index_dir: str | Path, embedder_config: EmbedderConfig | None = None, resources: ActorResources | None = None
):
    """Start a `RetrieverActor` with the given resources (default: 1 CPU, no GPU)."""
    resources = resources or ActorResources()
    return RetrieverActor.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus).remote(
        str(index_dir), embedder_config
    )
