"""Several LoRA adapters served by one vLLM engine: what `max_loras` and `max_cpu_loras` buy.

Four rank-8 LoRA adapters (random weights, the engine's default target projections) on the chat model. For each
setting, in this process one after the other: a `VLLMEngine` is started, the four adapters are loaded, and
`--requests` greedy chat requests of `--max-tokens` tokens are sent from `--concurrency` threads, adapters in
rotation (request i uses adapter i mod 4), then the same requests without adapters. Reported: output tokens per
second of each, and their ratio. Settings: one adapter per batch with one resident in host memory (every switch
reloads from disk), one per batch with all four resident, and all four in one batch.

Run: .venv/bin/python benchmarks/vllm_loras.py [--max-tokens 32] [--requests 32] [--concurrency 8]
Writes benchmarks/results/vllm_loras.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from trustray.artifacts import atomic_write_text
from trustray.models.engines import EngineConfig, SamplingParams
from trustray.models.sources import resolve_model_source
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
ADAPTERS = 4
SETTINGS = [{"max_loras": 1, "max_cpu_loras": 1}, {"max_loras": 1, "max_cpu_loras": 4},
            {"max_loras": 4, "max_cpu_loras": 4}]
logger = logging.getLogger("vllm_loras")


def make_adapters(folder: Path) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for index in range(ADAPTERS):
        torch.manual_seed(index)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_source(MODEL), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=EngineConfig().lora_target_modules,
                                                init_lora_weights=False))
        path = folder / f"adapter-{index}"
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def throughput(engine, adapters: list[str | None], args: argparse.Namespace) -> float:
    sampling = SamplingParams(max_tokens=args.max_tokens)

    def one(index: int) -> int:
        request = [{"role": "user", "content": f"Write a long story about a lighthouse keeper (#{index})."}]
        return engine.generate([request], sampling, adapters[index % len(adapters)])[0].completion_tokens

    began = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = sum(pool.map(one, range(args.requests)))
    return tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    from trustray.models.vllm_engine import VLLMEngine

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = make_adapters(Path(folder))
        for setting in SETTINGS:
            engine = VLLMEngine(EngineConfig(model=MODEL, engine="vllm", dtype="float32", max_model_len=1024,
                                             max_batch_size=args.concurrency, max_lora_rank=8, **setting))
            try:
                names = [f"adapter-{index}" for index in range(ADAPTERS)]
                for name, path in zip(names, paths, strict=True):
                    engine.load_adapter(name, path)
                throughput(engine, [None], args)  # warm-up
                with_adapters = throughput(engine, names, args)
                without = throughput(engine, [None], args)
            finally:
                engine.close()
            del engine
            gc.collect()
            row = {**setting, "adapters": ADAPTERS, "tokens_per_s_with_adapters": round(with_adapters, 1),
                   "tokens_per_s_without": round(without, 1), "ratio": round(with_adapters / without, 3)}
            logger.info("%s", row)
            rows.append(row)
    result = {"machine": machine_info(), "model": MODEL, "max_tokens": args.max_tokens, "requests": args.requests,
              "concurrency": args.concurrency, "rows": rows}
    atomic_write_text(RESULTS / "vllm_loras.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
