"""Faults under load in the Serve app (tiny model, loopback): a chat replica killed while requests are in flight (each
request either succeeds or gets a 503 a client can retry, and the app recovers by itself) and the Serve controller
killed (the app keeps serving)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import pytest
import ray

from trustray.config import load_config
from trustray.serve_apps.config import ServeConfig

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "tiny.yaml"
BODY = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24,
        "temperature": 0}


@pytest.fixture(scope="module")
def url(ray_local, tiny_llama_dir, free_port):
    from trustray.serve_apps.openai_app import run_app, shutdown

    base = run_app(load_config(ServeConfig, TINY_CONFIG, [f"port={free_port}", f"chat.model={tiny_llama_dir}",
                                                          "rag=null"]))
    yield base
    shutdown()


def _replica(deployment: str) -> str:
    """The name of the deployment's one replica actor (in the "serve" namespace)."""
    (name,) = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
               if actor["name"].startswith(f"SERVE_REPLICA::trustray#{deployment}#")]
    return name


def _load_with_fault(url: str, requests: int, fault) -> list[httpx.Response]:
    """`requests` chat requests from 8 threads; `fault()` runs once a few have been answered."""
    def ask(_: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(requests)]
        while sum(future.done() for future in futures) < 4:
            time.sleep(0.01)
        fault()
        wait(futures)
    return [future.result() for future in futures]


def test_a_killed_chat_replica_costs_only_retryable_503s_and_recovers(url):
    killed = _replica("ChatDeployment")
    answers = _load_with_fault(url, 48, lambda: ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 503}, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "replica_unavailable" and answer.headers["retry-after"] == "1"
    # No operator: Serve starts a new replica and the next requests succeed.
    deadline = time.monotonic() + 120
    while httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=120).status_code != 200:
        assert time.monotonic() < deadline, "the app did not recover"
        time.sleep(0.5)
    assert _replica("ChatDeployment") != killed


def test_a_killed_serve_controller_does_not_stop_serving(url):
    from ray import serve

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    answers = _load_with_fault(url, 32, lambda: ray.kill(controller, no_restart=False))
    assert [answer.status_code for answer in answers] == [200] * 32
    deadline = time.monotonic() + 120
    while True:  # the restarted controller takes the application back
        try:
            if serve.status().applications["trustray"].status == "RUNNING":
                break
        except ray.exceptions.RayError:  # the controller is still coming back
            pass
        assert time.monotonic() < deadline, "the Serve controller did not come back"
        time.sleep(0.5)
