"""Sentence embedders (sentence-transformers), the dense half of retrieval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field

from trustray.config import BaseConfig
from trustray.models.loading import resolve_device
from trustray.models.sources import DEFAULT_EMBEDDER, model_fingerprint, resolve_model_source


class EmbedderConfig(BaseConfig):
    model: str = Field(DEFAULT_EMBEDDER, description="Built-in name, sentence-transformers folder or HF id.")
    batch_size: int = Field(64, ge=1, description="Texts encoded per forward pass.")
    normalize: bool = Field(True, description="L2-normalise embeddings so inner product is cosine similarity.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU (None: default).")


class Embedder:
    """Encode texts to float32 vectors (normalised by default, for inner-product search)."""

    def __init__(self, config: EmbedderConfig | None = None, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.config = config or EmbedderConfig()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        device = str(resolve_device(device))
        self.model = SentenceTransformer(resolve_model_source(self.config.model), device=device)
        self.dim = int(self.model.get_embedding_dimension())
        self.fingerprint = model_fingerprint(self.config.model)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.config.batch_size,
            normalize_embeddings=self.config.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
