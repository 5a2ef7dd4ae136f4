"""Shared fixtures: offline environment, tiny models built in-process, one local Ray cluster per session."""

from __future__ import annotations

import os
import socket

from trustray.runtime import apply_offline_defaults

apply_offline_defaults()
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    from trustray.models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory) -> str:
    from trustray.models.tiny import build_tiny_bert_embedder

    return str(build_tiny_bert_embedder(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    from trustray.models.tiny import build_tiny_t5

    return str(build_tiny_t5(tmp_path_factory.mktemp("tiny-t5")))


@pytest.fixture(scope="session")
def tiny_index_dir(tiny_embedder_dir, tmp_path_factory) -> str:
    """A passage index of 10 tiny-corpus sentences embedded by the tiny embedder (for Serve tests)."""
    from trustray.artifacts import write_metadata
    from trustray.core.rag.index import PassageIndex
    from trustray.models.embedders import Embedder, EmbedderConfig
    from trustray.models.tiny import TINY_CORPUS

    folder = tmp_path_factory.mktemp("tiny-index")
    embedder = Embedder(EmbedderConfig(model=tiny_embedder_dir, torch_threads=1))
    texts = TINY_CORPUS[:10]
    titles = [text.split(" is ")[0] for text in texts]
    PassageIndex(embedder.encode(texts), [f"p{i}" for i in range(len(texts))], titles, texts).save(folder)
    write_metadata(folder, {"embedder_model": tiny_embedder_dir, "embedder_fingerprint": embedder.fingerprint})
    return str(folder)


@pytest.fixture(scope="module")
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (one per test module: each module starts its own app)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A local 2-CPU Ray cluster on 127.0.0.1, shared by every test that needs Ray."""
    import ray

    from trustray.actors.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()
