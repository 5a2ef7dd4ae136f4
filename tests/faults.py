"""Faults under load against a running Serve app (a helper of the tests and of benchmarks/reliability.py, not a
test): find a replica, send a bounded load while a fault happens, wait for the app to answer again."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import httpx
import ray

BODY = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24,
        "temperature": 0}


def replica_name(deployment: str, app: str = "trustray") -> str:
    """The name of the deployment's one replica actor (in the "serve" namespace)."""
    (name,) = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
               if actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]
    return name


def load_with_fault(url: str, requests: int, fault: Callable[[], None], body: dict = BODY,
                    threads: int = 8) -> tuple[list[httpx.Response | Exception], int]:
    """`requests` chat requests from `threads` threads; `fault()` runs once a few have been answered. Returns the
    answers (a request that got no HTTP answer at all as its exception) and how many were unanswered at the fault."""
    def ask(_: int) -> httpx.Response | Exception:
        try:
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        except httpx.HTTPError as error:
            return error

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(ask, i) for i in range(requests)]
        while sum(future.done() for future in futures) < 4:
            time.sleep(0.01)
        unanswered = sum(not future.done() for future in futures)
        fault()
        wait(futures)
    return [future.result() for future in futures], unanswered


def seconds_until_answered(url: str, body: dict = BODY, timeout_s: float = 120) -> float:
    """Seconds until a request succeeds again; AssertionError after `timeout_s`."""
    began = time.monotonic()
    while httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code != 200:
        assert time.monotonic() - began < timeout_s, "the app did not recover"
        time.sleep(0.5)
    return time.monotonic() - began


def summary(answers: list[httpx.Response | Exception]) -> dict[str, int]:
    """requests; failed (any answer but 200); lost (no HTTP answer); retryable (503 with Retry-After)."""
    responses = [answer for answer in answers if isinstance(answer, httpx.Response)]
    return {"requests": len(answers), "failed": sum(r.status_code != 200 for r in responses) + len(answers)
            - len(responses), "lost": len(answers) - len(responses),
            "retryable": sum(r.status_code == 503 and "retry-after" in r.headers for r in responses)}
