"""Shared fixtures: offline environment, tiny models built in-process, one local Ray cluster per session."""

from __future__ import annotations

import os

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
def ray_local():
    """A local 2-CPU Ray cluster on 127.0.0.1, shared by every test that needs Ray."""
    import ray

    from trustray.actors.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()
