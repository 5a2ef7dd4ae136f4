"""Overhead of serving: a 32-token greedy chat completion through Ray Serve vs the same call in-process.

The baseline is an `HFEngine` in this process with the same engine config (and so the same torch thread
count) as the chat replica. Baseline and Serve requests at concurrency 1 are measured in alternating rounds,
each while the other side is idle, so drift in machine load affects both alike. Then Serve alone is measured
at concurrency 4 and 8 (where its request batching applies).

    python benchmarks/serve_overhead.py [--config configs/serve/cpu.yaml] [--requests 20] [key.sub=value ...]

Writes benchmarks/results/serve_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to fly over the sea."}]
MAX_TOKENS = 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stats(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p95_ms": round(float(np.percentile(values, 95)), 2),
        "n": len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "serve" / "cpu.yaml"))
    parser.add_argument("--requests", type=int, default=20, help="Requests per side at concurrency 1.")
    parser.add_argument(
        "--rounds", type=int, default=None, help="Alternating baseline/Serve rounds at concurrency 1 (default: one request per round)."
    )
    parser.add_argument("overrides", nargs="*", help="Dotted ServeConfig overrides, e.g. chat.torch_threads=2.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_overhead.json"))
    args = parser.parse_args()

    from trustray.runtime import apply_offline_defaults, machine_info

    apply_offline_defaults()
    import httpx

    from trustray.config import load_config
    from trustray.models.engines import SamplingParams
    from trustray.models.hf_engine import HFEngine
    from trustray.serve_apps.config import ServeConfig
    from trustray.serve_apps.openai_app import run_app, shutdown

    load_at_start = round(os.getloadavg()[0], 2)
    config = load_config(ServeConfig, args.config, ["rag=null", f"port={_free_port()}", "chat.engine=hf", *args.overrides])
    url = run_app(config)
    body = {"model": config.model_name, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
    tokens_seen: list[int] = []

    try:
        http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))

        def serve_call() -> float:
            start = time.perf_counter()
            response = http.post(f"{url}/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - start
            response.raise_for_status()
            tokens_seen.append(response.json()["usage"]["completion_tokens"])
            return elapsed

        # Same engine config as the replica, so the same torch thread count; loaded after Serve is up.
        engine = HFEngine(config.chat)
        sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)

        def local_call() -> float:
            start = time.perf_counter()
            completion = engine.generate([MESSAGES], sampling)[0]
            elapsed = time.perf_counter() - start
            tokens_seen.append(completion.completion_tokens)
            return elapsed

        for _ in range(3):
            serve_call()
            local_call()
        tokens_seen.clear()

        per_round = max(1, args.requests // (args.rounds or args.requests))
        rounds = -(-args.requests // per_round)
        baseline, serve_1 = [], []
        wall_1 = 0.0
        for _ in range(rounds):
            baseline += [local_call() for _ in range(per_round)]
            start = time.perf_counter()
            serve_1 += [serve_call() for _ in range(per_round)]
            wall_1 += time.perf_counter() - start
        results = {"1": {**_stats(serve_1), "rps": round(len(serve_1) / wall_1, 3)}}
        print(f"baseline {_stats(baseline)}  serve c=1 {results['1']}", flush=True)

        for concurrency in (4, 8):
            count = 4 * concurrency
            with ThreadPoolExecutor(concurrency) as pool:
                start = time.perf_counter()
                latencies = list(pool.map(lambda _: serve_call(), range(count)))
                wall = time.perf_counter() - start
            results[str(concurrency)] = {**_stats(latencies), "rps": round(count / wall, 3)}
            print(f"serve c={concurrency} {results[str(concurrency)]}", flush=True)
        http.close()
    finally:
        shutdown()

    base = _stats(baseline)
    report = {
        "machine": {**machine_info(), "torch_threads": config.chat.torch_threads, "load_avg_1m_at_start": load_at_start},
        "model": config.chat.model,
        "request": {"max_tokens": MAX_TOKENS, "temperature": 0, "messages": MESSAGES},
        "completion_tokens": {"all_equal_max_tokens": all(t == MAX_TOKENS for t in tokens_seen),
                              "min": min(tokens_seen), "max": max(tokens_seen)},
        "p50_ratio": round(results["1"]["p50_ms"] / base["p50_ms"], 4),
        "p95_ratio": round(results["1"]["p95_ms"] / base["p95_ms"], 4),
        "baseline": {**base, "rps": round(len(baseline) / sum(baseline), 3)},
        "serve": results,
        "config": {"batch_max_size": config.batch_max_size, "batch_wait_timeout_s": config.batch_wait_timeout_s,
                   "chat_num_cpus": config.deployments.chat.resources.num_cpus},
        "command": " ".join(["python", "benchmarks/serve_overhead.py", *sys.argv[1:]]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
