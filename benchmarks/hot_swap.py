"""Adapter hot swap under load on the embedded default: how long until a newly published policy answers, and how
many requests fail meanwhile.

Serves the CPU preset's chat model (`configs/serve/cpu.yaml`, without RAG) with an adapter store, publishes one
DPO policy adapter from the active-preference grid as `aligned`, keeps `CLIENTS` clients asking it questions
(greedy, `MAX_TOKENS` tokens), publishes a second adapter mid-run, and keeps the load on `AFTER_S` seconds more.
Reported: requests and failed requests over the whole run; seconds from the publish call's return to the first
answer by the new version (it includes queueing behind the requests in flight and that request's generation);
the swap's cost to the first request sent after it (its latency minus the median latency before the publish:
`seconds`); and the adapter load time alone, measured in this process by the same `HFEngine.load_adapter` the
replicas run (median of `LOADS`).
Writes benchmarks/results/hot_swap.json. Needs two adapters: run benchmarks/active_preference.py first (or pass
--first and --second adapter folders).
Run: .venv/bin/python benchmarks/hot_swap.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

from trustray.artifacts import atomic_write_text
from trustray.config import load_config
from trustray.data import adapter_store
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "outputs" / "benchmarks" / "active_preference" / "sentiment-seed0" / "random" / "rounds"
FIRST = RUNS / "labels-16" / "dpo" / "step-6"
SECOND = RUNS / "labels-64" / "dpo" / "step-24"
CLIENTS = 4
MAX_TOKENS = 16
BEFORE_S, AFTER_S = 30.0, 30.0
LOADS = 5
PORT = 8123


def load_seconds(adapter: Path) -> float:
    """Median seconds of `HFEngine.load_adapter` for the default model (what a replica does on a swap)."""
    from trustray.models.engines import EngineConfig
    from trustray.models.hf_engine import HFEngine

    engine = HFEngine(EngineConfig(engine="hf", dtype="float32", torch_threads=1))
    times = []
    for index in range(LOADS):
        began = time.perf_counter()
        engine.load_adapter(f"v{index}", str(adapter))
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first", type=Path, default=FIRST)
    parser.add_argument("--second", type=Path, default=SECOND)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    import tempfile

    from trustray.serve_apps.config import ServeConfig
    from trustray.serve_apps.openai_app import run_app, shutdown

    store = Path(tempfile.mkdtemp(prefix="adapters-"))
    config = load_config(ServeConfig, ROOT / "configs/serve/cpu.yaml",
                         [f"port={PORT}", "rag=null", f"adapters={{store_dir: '{store}'}}"])
    first = adapter_store.publish(store, "aligned", args.first)
    base = run_app(config)
    results: list[dict] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while not stop.is_set():
                began = time.time()
                try:
                    reply = http.post(f"{base}/v1/chat/completions", json={
                        "model": "aligned", "max_tokens": MAX_TOKENS, "temperature": 0,
                        "messages": [{"role": "user", "content": "Continue this text in a positive tone: The city"}]})
                    ok = reply.status_code == 200
                    version = reply.json().get("system_fingerprint") if ok else None
                except httpx.HTTPError:
                    ok, version = False, None
                results.append({"sent": began, "done": time.time(), "ok": ok, "version": version})

    try:
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(BEFORE_S)
        second = adapter_store.publish(store, "aligned", args.second)
        published = time.time()
        time.sleep(AFTER_S)
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        shutdown()
    new = [r["done"] for r in results if r["version"] == f"aligned@{second}"]
    before = [r["done"] - r["sent"] for r in results if r["done"] < published and r["ok"]]
    after = sorted((r for r in results if r["sent"] >= published and r["ok"]), key=lambda r: r["sent"])
    latency_before = statistics.median(before) if before else None
    first_after = after[0]["done"] - after[0]["sent"] if after else None
    result = {
        "machine": machine_info(), "model": config.chat.model, "clients": CLIENTS, "max_tokens": MAX_TOKENS,
        "versions": [first, second], "requests": len(results), "failed_requests": sum(not r["ok"] for r in results),
        "answered_by_old_after_publish": sum(r["version"] == f"aligned@{first}" and r["sent"] > published
                                             for r in results),
        "publish_to_first_new_answer_s": round(min(new) - published, 3) if new else None,
        "median_latency_before_s": round(latency_before, 3) if latency_before is not None else None,
        "first_request_after_latency_s": round(first_after, 3) if first_after is not None else None,
        "load_adapter_s": round(load_seconds(args.second), 3),
    }
    if latency_before is not None and first_after is not None:
        result["seconds"] = round(first_after - latency_before, 3)
    atomic_write_text(ROOT / "benchmarks" / "results" / "hot_swap.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
