"""`EmbedderActor`: a Ray actor holding one `Embedder`, so many callers share one loaded model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray

from trustray.config import ActorResources
from trustray.models.embedders import Embedder, EmbedderConfig


@ray.remote
class EmbedderActor:
    def __init__(self, config: EmbedderConfig | None = None):
        self.embedder = Embedder(config)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.encode(texts)

    def info(self) -> dict[str, object]:
        """Model name, embedding dimension and weights fingerprint (what index metadata records)."""
        return {"model": self.embedder.config.model, "dim": self.embedder.dim, "fingerprint": self.embedder.fingerprint}


def start_embedder_actor(config: EmbedderConfig | None = None, resources: ActorResources | None = None):
    """Start an `EmbedderActor` with the given resources (default: 1 CPU, no GPU)."""
    resources = resources or ActorResources()
    return EmbedderActor.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus).remote(config)
