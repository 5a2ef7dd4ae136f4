"""The onnx-int8 embedder backend: close to the float32 vectors, exported once, and kept apart from torch indexes."""

from __future__ import annotations

import numpy as np
import pytest

from trustray.actors.retriever import Retriever
from trustray.artifacts import ArtifactMismatchError
from trustray.models.embedders import Embedder, EmbedderConfig, embedder_fingerprint
from trustray.models.tiny import TINY_CORPUS


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUSTRAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_int8_vectors_match_float32_and_the_export_is_cached(tiny_embedder_dir, cache):
    texts = TINY_CORPUS[:12] + ["short", "a much longer text " * 20]
    reference = Embedder(EmbedderConfig(model=tiny_embedder_dir, batch_size=4)).encode(texts)
    int8 = Embedder(EmbedderConfig(model=tiny_embedder_dir, batch_size=4, backend="onnx-int8", torch_threads=1))
    vectors = int8.encode(texts)
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = (vectors * reference).sum(axis=1)
    assert cosines.min() > 0.95  # rounding of the weights, not another model
    # Order is kept although batches are made of texts of similar length (activation scales are per batch, so
    # other batch-mates move a vector a little).
    assert (int8.encode(texts[::-1])[::-1] * vectors).sum(axis=1).min() > 0.99
    assert int8.encode([]).shape == (0, reference.shape[1])

    [exported] = list((cache / "onnx").glob("*-int8/model.onnx"))
    made = exported.stat().st_mtime_ns
    Embedder(EmbedderConfig(model=tiny_embedder_dir, backend="onnx-int8"))
    assert exported.stat().st_mtime_ns == made  # the second embedder reuses the export
    assert int8.fingerprint == embedder_fingerprint(int8.config) != embedder_fingerprint(
        EmbedderConfig(model=tiny_embedder_dir))


def test_an_index_and_its_queries_must_share_the_backend(tiny_index_dir, tiny_embedder_dir, cache):
    with pytest.raises(ArtifactMismatchError, match="use the same embedder or rebuild"):
        Retriever(tiny_index_dir, EmbedderConfig(model=tiny_embedder_dir, backend="onnx-int8"))


def test_gpu_and_unsupported_models_are_refused(tiny_embedder_dir, cache):
    from sentence_transformers import SentenceTransformer

    from trustray.models.onnx_embedder import _structure

    model = SentenceTransformer(tiny_embedder_dir, device="cpu")
    assert _structure(list(model))[0] == "mean"
    with pytest.raises(ValueError, match="Transformer -> Pooling"):
        _structure([model[0]])
    with pytest.raises(ValueError, match="CPU only"):
        Embedder(EmbedderConfig(model=tiny_embedder_dir, backend="onnx-int8"), device="meta")
