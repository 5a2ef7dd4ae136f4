"""Sentence embedders (sentence-transformers), the dense half of retrieval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

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
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU (None: default); the "
                                      "onnx-int8 backend's threads too.")
    backend: Literal["torch", "onnx-int8"] = Field(
        "torch", description="`torch` (sentence-transformers, float32) or `onnx-int8` (ONNX Runtime on CPU, int8 "
        "weights: faster, slightly different vectors; an index and its queries must use the same backend).",
    )


def embedder_fingerprint(config: EmbedderConfig) -> str:
    """Names the vectors an embedder makes: its weights, plus the backend when that is not torch (another
    backend's vectors lie slightly elsewhere, so an index records which one made it)."""
    weights = model_fingerprint(config.model)
    return weights if config.backend == "torch" else f"{weights}-{config.backend}"


class Embedder:
    """Encode texts to float32 vectors (normalised by default, for inner-product search)."""

    def __init__(self, config: EmbedderConfig | None = None, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.config = config or EmbedderConfig()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        device = str(resolve_device(device))
        if self.config.backend == "onnx-int8" and device != "cpu":
            raise ValueError(f"the onnx-int8 embedder runs on CPU only, not {device}; use backend: torch")
        self.model = SentenceTransformer(resolve_model_source(self.config.model), device=device)
        self.dim = int(self.model.get_embedding_dimension())
        self.onnx = None
        if self.config.backend == "onnx-int8":
            from trustray.models.onnx_embedder import OnnxInt8Encoder

            self.onnx = OnnxInt8Encoder(self.model, model_fingerprint(self.config.model), self.config.torch_threads)
        self.fingerprint = embedder_fingerprint(self.config)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.onnx is not None:
            return self.onnx.encode(list(texts), self.config.batch_size, self.config.normalize)
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
