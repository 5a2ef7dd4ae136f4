"""Published LoRA adapters are served by name and hot-swapped: a new version answers from the next request on,
and requests running during the swap all succeed."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import torch

from trustray.config import load_config
from trustray.data import adapter_store
from trustray.serve_apps.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


def _adapter(tiny_llama_dir: str, folder: Path, seed: int) -> Path:
    from transformers import AutoModelForCausalLM

    from trustray.core.influence.warmup import LoraSettings, add_lora

    torch.manual_seed(seed)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraSettings(r=4, layers=[-1]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give each version a visible effect
            torch.nn.init.normal_(parameter, std=2.0)
    model.save_pretrained(folder)
    return folder


def test_publish_is_atomic_and_versioned(tiny_llama_dir, tmp_path):
    first = _adapter(tiny_llama_dir, tmp_path / "a1", seed=1)
    version = adapter_store.publish(tmp_path / "store", "aligned", first)
    assert adapter_store.current(tmp_path / "store", "aligned") == (version, tmp_path / "store/aligned/versions" / version)
    assert adapter_store.publish(tmp_path / "store", "aligned", first) == version  # same weights, same version
    assert adapter_store.names(tmp_path / "store") == ["aligned"]
    assert adapter_store.current(tmp_path / "store", "missing") is None
    with pytest.raises(ValueError):
        adapter_store.publish(tmp_path / "store", "../escape", first)
    with pytest.raises(FileNotFoundError):
        adapter_store.publish(tmp_path / "store", "aligned", tmp_path)


@pytest.fixture(scope="module")
def served(ray_local, tiny_llama_dir, tmp_path_factory, free_port):
    from trustray.serve_apps.openai_app import run_app, shutdown

    store = tmp_path_factory.mktemp("adapters")
    config = load_config(ServeConfig, ROOT / "configs/serve/tiny.yaml", [
        f"port={free_port}", f"chat.model={tiny_llama_dir}", "rag=null", f"adapters={{store_dir: '{store}'}}"])
    base = run_app(config)
    yield base, store, config.model_name
    shutdown()


def _ask(base: str, model: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 6, "temperature": 0})


def test_hot_swap_serves_the_new_version_and_fails_no_request(served, tiny_llama_dir, tmp_path):
    base, store, base_model = served
    assert _ask(base, "aligned").status_code == 404  # nothing published yet
    v1 = adapter_store.publish(store, "aligned", _adapter(tiny_llama_dir, tmp_path / "a1", seed=1))
    assert "aligned" in [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    first = _ask(base, "aligned").json()
    assert first["system_fingerprint"] == f"aligned@{v1}"
    plain = _ask(base, base_model).json()
    assert "system_fingerprint" not in plain
    statuses: list[int] = []
    fingerprints: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            reply = _ask(base, "aligned")
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                fingerprints.append(reply.json()["system_fingerprint"])

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        while len(statuses) < 3:
            threading.Event().wait(0.05)
        v2 = adapter_store.publish(store, "aligned", _adapter(tiny_llama_dir, tmp_path / "a2", seed=2))
        after = _ask(base, "aligned").json()
        while len(statuses) < 12:
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert after["system_fingerprint"] == f"aligned@{v2}"
    assert set(statuses) == {200}
    assert f"aligned@{v2}" in fingerprints and v1 != v2
