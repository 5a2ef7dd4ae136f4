"""The alignment side of the Serve app, on the tiny model and one app: /v1/rewards and selective answers from a
reward model the preference loop saved, and published LoRA adapters served by name and hot-swapped (a new version
answers from the next request on, and requests running during the swap all succeed)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
import torch

from trustray.config import load_config
from trustray.data import adapter_store, preferences
from trustray.serve_apps.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LengthOracle(preferences.Oracle):
    """Gold reward = response length (the tiny model's answers are noise to the packaged oracles)."""

    task: ClassVar[str] = "factual"

    def reward(self, prompt, response: str) -> float:
        return float(len(response))


@pytest.fixture(scope="module")
def reward_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    from trustray.pipelines.active_preference import ActivePreferenceConfig, run

    folder = tmp_path_factory.mktemp("loop")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(preferences.ORACLES, "factual", LengthOracle)
        config = load_config(ActivePreferenceConfig, ROOT / "configs/active_preference/tiny.yaml", [
            f"chat.model={tiny_llama_dir}", f"output_dir={folder}", "resources.in_process=true", "budgets=[4]",
            "acceptable_reward=10"])
        run(config)
    return folder / "rounds" / "labels-4" / "reward_model"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def url(ray_local, tiny_llama_dir, reward_dir, adapters_dir, free_port):
    from trustray.serve_apps.openai_app import run_app, shutdown

    config = load_config(ServeConfig, ROOT / "configs/serve/tiny.yaml", [
        f"port={free_port}", f"chat.model={tiny_llama_dir}", "rag=null", f"reward={{model_dir: '{reward_dir}'}}",
        "deployments.reward.resources.num_cpus=0.1", f"adapters={{store_dir: '{adapters_dir}'}}"])
    base = run_app(config)
    yield base, config.model_name
    shutdown()


def test_rewards_endpoint_scores_like_the_scorer(url, reward_dir):
    from trustray.actors.reward import RewardScorer

    base, _ = url
    responses = ["Paris.", "It is Paris, the capital of France, on the Seine."]
    reply = httpx.post(f"{base}/v1/rewards", json={"prompt": "What is the capital of France?",
                                                   "responses": responses}, timeout=60)
    assert reply.status_code == 200
    data = reply.json()["data"]
    expected = RewardScorer(str(reward_dir)).score([{"role": "user", "content": "What is the capital of France?"}],
                                                   responses)
    for row, want in zip(data, expected, strict=True):
        assert row["reward"] == pytest.approx(want["reward"], abs=1e-4)
        assert row["uncertainty"] >= 0 and row["ood_score"] == pytest.approx(want["ood_score"], rel=1e-4)
    bad = httpx.post(f"{base}/v1/rewards", json={"prompt": "x", "responses": []}, timeout=30)
    assert bad.status_code == 400


def test_selective_answers_abstain_below_the_threshold(url):
    base, model = url
    body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0}
    answered = httpx.post(f"{base}/v1/chat/completions", json={**body, "selective": {"threshold": -1e9}}, timeout=60)
    assert answered.status_code == 200 and answered.json()["selective"]["abstained"] is False
    plain = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
    assert answered.json()["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    refused = httpx.post(f"{base}/v1/chat/completions", json={**body, "selective": {"threshold": 1e9}}, timeout=60)
    payload = refused.json()
    assert payload["selective"]["abstained"] is True and payload["selective"]["reward"] < 1e9
    assert payload["choices"][0]["message"]["content"] == "I am not confident enough in an answer to this."
    calibrated = httpx.post(f"{base}/v1/chat/completions", json={**body, "selective": {"max_risk": 0.5}}, timeout=60)
    assert calibrated.status_code == 200 and calibrated.json()["selective"]["max_risk"] == 0.5
    for wrong in ({"max_risk": 0.1, "threshold": 1.0}, {}, {"max_risk": 2}):
        assert httpx.post(f"{base}/v1/chat/completions", json={**body, "selective": wrong}, timeout=30).status_code == 400
    streamed = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": True, "selective": {"max_risk": 0.1}},
                          timeout=30)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "selective"


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


def _ask(base: str, model: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 6, "temperature": 0})


def test_hot_swap_serves_the_new_version_and_fails_no_request(url, adapters_dir, tiny_llama_dir, tmp_path):
    (base, base_model), store = url, adapters_dir
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
