"""What an edit set served as weight deltas costs on the vLLM engine.

`ChatModel` on `VLLMEngine` runs an edited request with its deltas applied to the shared weights, every other
request held back meanwhile (`ChatModel.edited`), and vLLM's prefix cache reset on apply and on revert (cached KV
blocks were computed with the other weights). Measured in this process, with a MALMEN-shaped edit set (random
deltas of scale `--scale` on the MLP down projections of the top six layers), greedy requests of `--max-tokens`:
- p50 seconds of applying and reverting the deltas alone;
- p50 latency of a request alone, plain and edited;
- output tokens per second of `--clients` threads sending plain requests, without and with one more thread
  sending edited requests one after another meanwhile.

Run: .venv/bin/python benchmarks/vllm_edit_cost.py [--max-tokens 32] [--clients 8] [--requests 32]
Writes benchmarks/results/vllm_edit_cost.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoConfig

from trustray.artifacts import atomic_write_text
from trustray.models.engines import EngineConfig, SamplingParams
from trustray.models.sources import resolve_model_source
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
EDITED_LAYERS = 6
logger = logging.getLogger("vllm_edit_cost")


def request(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about a lighthouse keeper (#{index})."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="plain requests in each throughput run")
    parser.add_argument("--scale", type=float, default=1e-3)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    from trustray.actors.chat import ChatModel

    chat = ChatModel(EngineConfig(model=MODEL, engine="vllm", dtype="float32", max_model_len=1024,
                                  max_batch_size=args.clients + 1))
    model_config = AutoConfig.from_pretrained(resolve_model_source(MODEL))
    layers = model_config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    delta = {f"model.layers.{layer}.mlp.down_proj.weight":  # [hidden, intermediate], as in the HF checkpoint
             args.scale * torch.randn(model_config.hidden_size, model_config.intermediate_size, generator=generator)
             for layer in range(layers - EDITED_LAYERS, layers)}
    edit = ("edit", delta, None)
    sampling = SamplingParams(max_tokens=args.max_tokens)
    try:
        chat.generate([request(-1)], sampling)  # warm-up
        apply_revert = []
        for _ in range(8):
            began = time.perf_counter()
            chat.engine.apply_delta(*edit)
            chat.engine.revert_delta("edit")
            apply_revert.append(time.perf_counter() - began)

        def alone(edited: bool) -> float:
            began = time.perf_counter()
            with chat.edited(edit if edited else None):
                chat.engine.generate([request(0)], sampling)
            return time.perf_counter() - began

        plain_alone = statistics.median(alone(False) for _ in range(8))
        edited_alone = statistics.median(alone(True) for _ in range(8))

        def plain_throughput(with_edits: bool) -> tuple[float, int]:
            stop, edited_done = threading.Event(), []

            def edits() -> None:
                while not stop.is_set():
                    alone(True)
                    edited_done.append(1)

            def one(index: int) -> int:
                return chat.generate([request(index)], sampling)[0].completion_tokens

            editor = threading.Thread(target=edits) if with_edits else None
            if editor:
                editor.start()
            began = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                tokens = sum(pool.map(one, range(args.requests)))
            seconds = time.perf_counter() - began
            stop.set()
            if editor:
                editor.join()
            return tokens / seconds, len(edited_done)

        without, _ = plain_throughput(False)
        with_edits, edited_requests = plain_throughput(True)
    finally:
        chat.engine.close()
    result = {"machine": machine_info(), "model": MODEL, "max_tokens": args.max_tokens, "clients": args.clients,
              "edited_parameters": sorted(delta), "delta_scale": args.scale,
              "apply_and_revert_p50_s": round(statistics.median(apply_revert), 4),
              "plain_alone_p50_s": round(plain_alone, 3), "edited_alone_p50_s": round(edited_alone, 3),
              "plain_tokens_per_s": round(without, 1), "plain_tokens_per_s_with_edits": round(with_edits, 1),
              "edited_requests_meanwhile": edited_requests,
              "plain_throughput_kept": round(with_edits / without, 3)}
    logger.info("%s", result)
    atomic_write_text(RESULTS / "vllm_edit_cost.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
