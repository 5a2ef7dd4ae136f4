"""Plain chat over HTTP, three ways, on this machine: trustray's OpenAI app with the transformers engine, the same
app with the vLLM engine, and Ray Serve LLM (`ray.serve.llm.build_openai_app`, vLLM inside).

Each app serves the embedded default chat model alone (no RAG) on 127.0.0.1, one replica, and is started, measured
and shut down before the next one starts. Every app gets the same requests through the `openai` client: greedy
chat completions of `--max-tokens` tokens, first one at a time (p50 latency of a whole request and of the first
streamed piece), then `--concurrency` clients at once (completion tokens per second, p50 latency). The vLLM
settings are the same in both vLLM apps (float32, eager, the same KV cache and batch size, no core reserved).
Ray Serve LLM needs `accelerator_config: {kind: cpu}` on a machine without a GPU: without it, its placement group
asks for a GPU and the app waits forever.

Run: .venv/bin/python benchmarks/serve_llm_compare.py [--max-tokens 32] [--concurrency 8] [--requests 8]
Writes benchmarks/results/serve_llm_compare.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trustray.artifacts import atomic_write_text
from trustray.models.engines import EngineConfig
from trustray.models.sources import resolve_model_source
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
KV_CACHE_GIB = 1
logger = logging.getLogger("serve_llm_compare")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long, detailed story about a lighthouse keeper (#{index})."}]


def measure(base_url: str, model: str, args: argparse.Namespace) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    kwargs = {"model": model, "max_tokens": args.max_tokens, "temperature": 0}
    client.chat.completions.create(messages=messages(-1), **kwargs)  # warm-up
    single, first_piece = [], []
    for index in range(args.requests):
        began = time.perf_counter()
        first = None
        for chunk in client.chat.completions.create(messages=messages(index), stream=True, **kwargs):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - began
        single.append(time.perf_counter() - began)
        first_piece.append(first)

    def one(index: int) -> tuple[int, float]:
        began = time.perf_counter()
        response = client.chat.completions.create(messages=messages(index), **kwargs)
        return response.usage.completion_tokens, time.perf_counter() - began

    began = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(one, range(args.concurrency * 2)))
    seconds = time.perf_counter() - began
    return {"p50_latency_s": round(statistics.median(single), 3),
            "p50_first_piece_s": round(statistics.median(first_piece), 3),
            "concurrency": args.concurrency, "requests_at_concurrency": len(answers),
            "tokens_per_s": round(sum(tokens for tokens, _ in answers) / seconds, 2),
            "p50_latency_at_concurrency_s": round(statistics.median(s for _, s in answers), 3)}


def trustray_app(engine: str, args: argparse.Namespace) -> dict:
    from trustray.serve_apps.config import ServeConfig
    from trustray.serve_apps.openai_app import run_app, shutdown

    port = free_port()
    config = ServeConfig.model_validate({
        "host": "127.0.0.1", "port": port, "model_name": MODEL,
        "chat": {"model": MODEL, "engine": engine, "dtype": "float32", "max_model_len": 1024,
                 "max_batch_size": args.concurrency, "torch_threads": 2 if engine == "hf" else None,
                 "cpu_kv_cache_gib": KV_CACHE_GIB},
        "batch_max_size": args.concurrency,
        "deployments": {"chat": {"resources": {"num_cpus": 0.25}, "max_ongoing_requests": 16,
                                 "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                        "ingress": {"resources": {"num_cpus": 0.1},
                                    "autoscaling": {"min_replicas": 1, "max_replicas": 1}}},
    })
    began = time.perf_counter()
    url = run_app(config)
    startup = time.perf_counter() - began
    try:
        return {"app": f"trustray ({engine})", "startup_s": round(startup, 1), **measure(url, MODEL, args)}
    finally:
        shutdown()


def serve_llm_app(args: argparse.Namespace) -> dict:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from trustray.actors.cluster import init_ray

    init_ray()
    port = free_port()
    engine = EngineConfig(model=MODEL)
    env = {key: os.environ[key] for key in ("HF_HUB_OFFLINE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") if key in os.environ}
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(engine.cpu_reserved_cores)
    llm = LLMConfig(
        model_loading_config={"model_id": MODEL, "model_source": resolve_model_source(MODEL)},
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 0.5}]},
        engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 1024,
                       "kv_cache_memory_bytes": KV_CACHE_GIB * 2**30, "max_num_seqs": args.concurrency},
        runtime_env={"env_vars": env},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1},
                           "ray_actor_options": {"num_cpus": 0.25}},
    )
    app = build_openai_app({"llm_configs": [llm], "ingress_deployment_config": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1},
        "ray_actor_options": {"num_cpus": 0.1}}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    began = time.perf_counter()
    serve.run(app, name="serve-llm", route_prefix="/")
    startup = time.perf_counter() - began
    try:
        return {"app": "ray.serve.llm", "startup_s": round(startup, 1),
                **measure(f"http://127.0.0.1:{port}", MODEL, args)}
    finally:
        serve.delete("serve-llm")
        serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="requests one at a time")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    machine = machine_info()
    apps = [trustray_app("hf", args), trustray_app("vllm", args), serve_llm_app(args)]
    import ray
    import vllm

    ray.shutdown()
    by_name = {app["app"]: app for app in apps}
    ours, theirs = by_name["trustray (vllm)"], by_name["ray.serve.llm"]
    result = {"machine": machine, "model": MODEL, "max_tokens": args.max_tokens, "vllm_version": vllm.__version__,
              "apps": apps,
              "serve_llm_over_trustray_vllm": {
                  "tokens_per_s": round(theirs["tokens_per_s"] / ours["tokens_per_s"], 3),
                  "p50_latency_s": round(theirs["p50_latency_s"] / ours["p50_latency_s"], 3)}}
    atomic_write_text(RESULTS / "serve_llm_compare.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
