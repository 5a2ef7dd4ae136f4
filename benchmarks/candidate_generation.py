"""Candidate generation of the preference loop: the policy worker (transformers) against the vLLM generation pool.

For each engine, builds the loop of `configs/active_preference/cpu.yaml` in this process (`resources.in_process`;
with vLLM that is the transformers policy worker, which still scores, plus one vLLM engine that samples) and times
what the loop does: its start, then the pool's candidates (every pool prompt, `samples_per_prompt` responses at
temperature one, `max_tokens` each, one seed) and the eval prompts' greedy answers. The engines run one after the
other (transformers first), never side by side. Both sample the same model, so the mean gold reward of their
candidates should agree: its difference is reported with a 95% Welch interval, next to how many greedy answers
are identical (float32 on both; vLLM's kernels are not transformers', so near-ties may flip).

Run: .venv/bin/python benchmarks/candidate_generation.py [--task sentiment] [--seed 0]
Writes benchmarks/results/candidate_generation.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy import stats

from trustray.artifacts import atomic_write_text
from trustray.config import load_config
from trustray.pipelines.active_preference import ActivePreferenceConfig, Loop
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "active_preference" / "cpu.yaml"
OUT = ROOT / "outputs" / "benchmarks" / "candidate_generation"
logger = logging.getLogger("candidate_generation")


def measure(args: argparse.Namespace, engine: str) -> tuple[dict, list[float], list[str]]:
    """One engine's timings, its candidates' gold rewards and its greedy eval answers."""
    config = load_config(ActivePreferenceConfig, CONFIG, [
        f"task={args.task}", f"seed={args.seed}", f"chat.engine={engine}", "resources.in_process=true",
        f"output_dir={OUT / engine}"])
    began = time.perf_counter()
    loop = Loop(config, OUT / engine)
    loop.sample(loop.prompts["pool"][:1], 1, 0.0, 0)  # the first request pays for lazy set-up in both engines
    started = time.perf_counter() - began
    try:
        began = time.perf_counter()
        pool = loop.sample(loop.prompts["pool"], config.samples_per_prompt, 1.0, args.seed)
        pool_s = time.perf_counter() - began
        began = time.perf_counter()
        greedy = [rows[0]["text"] for rows in loop.sample(loop.prompts["eval"], 1, 0.0, 0)]
        greedy_s = time.perf_counter() - began
        rewards = [loop.oracle.reward(prompt, row["text"])
                   for prompt, rows in zip(loop.prompts["pool"], pool, strict=True) for row in rows]
        tokens = sum(row["tokens"] for rows in pool for row in rows)
    finally:
        loop.close()
    del loop
    gc.collect()
    result = {"engine": engine, "startup_s": round(started, 1), "pool_responses": len(rewards),
              "pool_tokens": tokens, "pool_s": round(pool_s, 1), "pool_tokens_per_s": round(tokens / pool_s, 1),
              "eval_greedy_s": round(greedy_s, 1), "mean_gold_reward": round(float(np.mean(rewards)), 4)}
    logger.info("%s: %s", engine, result)
    return result, rewards, greedy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sentiment", choices=["sentiment", "factual"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    hf, hf_rewards, hf_greedy = measure(args, "hf")
    vllm, vllm_rewards, vllm_greedy = measure(args, "vllm")
    welch = stats.ttest_ind(vllm_rewards, hf_rewards, equal_var=False)
    interval = welch.confidence_interval(0.95)
    config = load_config(ActivePreferenceConfig, CONFIG, [f"task={args.task}"])
    result = {
        "machine": machine_info(), "task": args.task, "seed": args.seed, "model": config.chat.model,
        "settings": {"pool": config.prompts.pool, "samples_per_prompt": config.samples_per_prompt,
                     "max_tokens": config.max_tokens, "eval": config.prompts.eval,
                     "hf_max_batch_size": config.chat.max_batch_size, "torch_threads": config.chat.torch_threads},
        "engines": [hf, vllm],
        "pool_speedup": round(hf["pool_s"] / vllm["pool_s"], 2),
        "loop_seconds_saved": round(hf["startup_s"] + hf["pool_s"] + hf["eval_greedy_s"]
                                    - vllm["startup_s"] - vllm["pool_s"] - vllm["eval_greedy_s"], 1),
        "gold_reward_difference": {"vllm_minus_hf": round(float(np.mean(vllm_rewards) - np.mean(hf_rewards)), 4),
                                   "ci95": [round(float(interval.low), 4), round(float(interval.high), 4)]},
        "greedy_identical": sum(a == b for a, b in zip(hf_greedy, vllm_greedy, strict=True)),
        "greedy_answers": len(hf_greedy),
    }
    atomic_write_text(RESULTS / "candidate_generation.json", json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", RESULTS / "candidate_generation.json")


if __name__ == "__main__":
    main()
