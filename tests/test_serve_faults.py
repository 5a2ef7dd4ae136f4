"""Faults under load in the Serve app (tiny model, loopback): a chat replica killed while requests are in flight (each
request either succeeds or gets a 503 a client can retry, and the app recovers by itself) and the Serve controller
killed (the app keeps serving)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import ray
from faults import load_with_fault, replica_name, seconds_until_answered, summary

from trustray.config import load_config
from trustray.serve_apps.config import ServeConfig

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "tiny.yaml"


@pytest.fixture(scope="module")
def url(ray_local, tiny_llama_dir, free_port):
    from trustray.serve_apps.openai_app import run_app, shutdown

    base = run_app(load_config(ServeConfig, TINY_CONFIG, [f"port={free_port}", f"chat.model={tiny_llama_dir}",
                                                          "rag=null"]))
    yield base
    shutdown()


def test_a_killed_chat_replica_costs_only_retryable_503s_and_recovers(url):
    killed = replica_name("ChatDeployment")
    answers, unanswered = load_with_fault(url, 48, lambda: ray.kill(ray.get_actor(killed, namespace="serve"),
                                                                    no_restart=True))
    assert unanswered > 0
    counts = summary(answers)
    assert counts["lost"] == 0 and counts["failed"] == counts["retryable"], counts
    for answer in answers:
        assert answer.status_code in (200, 503)
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "replica_unavailable" and answer.headers["retry-after"] == "1"
    # No operator: Serve starts a new replica and the next requests succeed.
    seconds_until_answered(url)
    assert replica_name("ChatDeployment") != killed


def test_a_killed_serve_controller_does_not_stop_serving(url):
    from ray import serve

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    answers, _ = load_with_fault(url, 32, lambda: ray.kill(controller, no_restart=False))
    assert [answer.status_code for answer in answers if isinstance(answer, httpx.Response)] == [200] * 32
    deadline = time.monotonic() + 120
    while True:  # the restarted controller takes the application back
        try:
            if serve.status().applications["trustray"].status == "RUNNING":
                break
        except ray.exceptions.RayError:  # the controller is still coming back
            pass
        assert time.monotonic() < deadline, "the Serve controller did not come back"
        time.sleep(0.5)
