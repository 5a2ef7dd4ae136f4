"""Retrieve → compress → generate in the Serve app: the compressor deployment with a tiny embedder's scorer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from trustray.config import load_config
from trustray.serve_apps.config import ServeConfig

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "tiny.yaml"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# The random tiny embedder's top 3 differ run to run (near-tied similarities). At 40 tokens every tiny-corpus sentence
# fits under its title (at most 34) and any 3 passages are longer (at least 50), so the answer is never closed book and
# always compressed, whatever was retrieved. (24 failed in CI when only long sentences were retrieved.)
BUDGET = 40


@pytest.fixture(scope="module")
def serve_config(tiny_llama_dir, tiny_embedder_dir, tiny_index_dir, free_port) -> ServeConfig:
    return load_config(ServeConfig, TINY_CONFIG, [
        f"port={free_port}", f"chat.model={tiny_llama_dir}", f"rag.index_dir={tiny_index_dir}",
        f"rag.embedder.model={tiny_embedder_dir}",
        f"rag.compressor={{name: extractive, budget: {BUDGET}, embedder: {{model: {tiny_embedder_dir}}}}}",
        "deployments.compressor.resources.num_cpus=0.25",
    ])


@pytest.fixture(scope="module")
def url(ray_local, serve_config):
    from trustray.serve_apps.openai_app import run_app, shutdown

    base = run_app(serve_config)
    yield base
    shutdown()


def test_the_rag_answer_reports_the_compressed_context_and_token_counts(url, serve_config):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    response = client.chat.completions.create(model="rag", messages=MESSAGES, max_tokens=8, temperature=0)
    compression = response.model_extra["compression"]
    assert compression["compressor"] == "extractive" and compression["closed_book"] is False
    assert 0 < compression["tokens_after"] <= BUDGET < compression["tokens_before"]
    assert response.usage.model_extra["context_tokens"] == compression["tokens_after"]
    assert len(response.model_extra["sources"]) == serve_config.rag.top_k  # what was retrieved, before compression
    setting = response.model_extra["retrieval"]
    assert (setting["compressor"], setting["budget"], setting["top_k"]) == ("extractive", BUDGET, serve_config.rag.top_k)
    plain = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
    assert "compression" not in (plain.model_extra or {})

    body = {"model": "rag", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as stream:
        events = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["compression"] == compression and json.loads(events[0])["retrieval"] == setting
