"""Fidelity of reduced influence scores: Spearman ρ and top-1% / top-5% overlap against exact LESS scores.

    python benchmarks/influence_fidelity.py                                   # random-init LoRA r=8 on q/k/v/o
    python benchmarks/influence_fidelity.py --checkpoint outputs/influence/cpu/warmup/checkpoint-28

On the embedded default SmolLM2-135M-Instruct, per-example LoRA gradients of a small instruction pool and its
target tasks are computed once (fp32, batched hooks). The exact score of a pool example is LESS's: cosine of the
unreduced flat gradients, averaged over each target task and maxed over tasks. Every reduction at every dim is
scored the same way from its features and compared with the exact scores. Random projections are applied to pool
and targets in one call, so their blocks are generated once per dim. `pca` and `kron` with `init=pca` are fitted
on the pool's own gradients, so their numbers are in-sample (the most favourable case for a fitted basis).
Writes benchmarks/results/influence_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustray.core.influence.batching import ResponseTruncatedError, collate, encode_chat
from trustray.core.influence.fidelity import fidelity_row
from trustray.core.influence.gradients import GradientBatch, per_example_gradients
from trustray.core.influence.reductions import make_reduction
from trustray.core.influence.scoring import aggregate_targets, influence_scores
from trustray.core.influence.warmup import load_checkpoint
from trustray.data.instructions import build_instruction_pool
from trustray.models.sources import resolve_model_source
from trustray.runtime import apply_offline_defaults, machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "influence_fidelity.json"
MODEL = "smollm2-135m-instruct"
# (result key, registry name, options)
REDUCTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("gaussian", "gaussian", {}),
    ("rademacher", "rademacher", {}),
    ("sjlt", "sjlt", {"chunk": 2**17}),
    ("pca", "pca", {}),
    ("kron-random", "kron", {"init": "random"}),
    ("kron-pca", "kron", {"init": "pca"}),
]


def build_model(checkpoint: str | None, rank: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model_source(MODEL), dtype=torch.float32)
    if checkpoint:
        return load_checkpoint(checkpoint, base)[0].eval()
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(base, config).eval()


def encode(tokenizer: Any, rows: list[dict], max_length: int) -> list[dict]:
    """Encoded rows (sorted by length, to cut padding), keeping each row's `task`; truncated-away rows dropped."""
    encoded = []
    for row in rows:
        try:
            example = encode_chat(tokenizer, row["messages"], max_length)
        except ResponseTruncatedError:
            continue
        encoded.append({**example, "task": row.get("task", "")})
    return sorted(encoded, key=lambda example: len(example["input_ids"]))


def gradients(model: Any, examples: list[dict], batch_size: int, pad_id: int) -> list[GradientBatch]:
    return [per_example_gradients(model, collate(examples[start : start + batch_size], pad_id))
            for start in range(0, len(examples), batch_size)]


def scores(train: torch.Tensor, targets: torch.Tensor, tasks: list[str]) -> np.ndarray:
    return aggregate_targets(influence_scores(train.numpy(), targets.numpy(), "cosine"), tasks)


def skip_reason(name: str, dim: int, total: int, pool: int, modules: int) -> str | None:
    if dim > total:
        return f"dim exceeds D={total}"
    if name == "pca" and dim > pool:
        return f"PCA rank is bounded by the {pool} pool examples it is fitted on"
    if name == "kron" and dim < modules:
        return f"kron needs at least one feature per LoRA module ({modules})"
    return None


def main(argv: list[str] | None = None) -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=96, help="training pool size")
    parser.add_argument("--targets-per-topic", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--max-chars", type=int, default=600, help="intro characters kept per example")
    parser.add_argument("--dims", default="32,128,512,2048,8192")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on q/k/v/o (ignored with --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="a warmup checkpoint folder instead of random-init LoRA")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dims = [int(dim) for dim in args.dims.split(",")]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(MODEL))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = build_model(args.checkpoint, args.lora_rank)
    pool_rows, target_rows = build_instruction_pool(args.pool, args.targets_per_topic, args.seed,
                                                    max_chars=args.max_chars)
    pool, targets = encode(tokenizer, pool_rows, args.max_length), encode(tokenizer, target_rows, args.max_length)
    tasks = [example["task"] for example in targets]

    start = time.perf_counter()
    pool_batches = gradients(model, pool, args.batch_size, pad_id)
    target_batches = gradients(model, targets, args.batch_size, pad_id)
    pool_flat = torch.cat([batch.flat() for batch in pool_batches])
    target_flat = torch.cat([batch.flat() for batch in target_batches])
    both_flat = torch.cat([pool_flat, target_flat])
    total, modules = pool_flat.shape[1], len(pool_batches[0].factors)
    exact = scores(pool_flat, target_flat, tasks)
    print(f"gradients: {len(pool)} pool + {len(targets)} targets, D={total}, {time.perf_counter() - start:.0f}s")

    results: dict[str, list[dict]] = {}
    skipped: dict[str, list[dict]] = {}
    for key, name, options in REDUCTIONS:
        for dim in dims:
            reason = skip_reason(name, dim, total, len(pool), modules)
            if reason:
                skipped.setdefault(key, []).append({"dim": dim, "reason": reason})
                continue
            start = time.perf_counter()
            reduction = make_reduction(name, dim, args.seed, **options)
            if name == "kron":
                reduction.fit(pool_batches)
                train = torch.cat([reduction.transform(batch) for batch in pool_batches])
                query = torch.cat([reduction.transform(batch) for batch in target_batches])
            else:
                reduction.fit(pool_flat)
                train, query = reduction.transform(both_flat).split([len(pool), len(targets)])
            row = {"dim": dim, **fidelity_row(exact, scores(train, query, tasks))}
            if name == "kron":
                row["actual_dim"] = reduction.dim
            row["seconds"] = round(time.perf_counter() - start, 2)
            results.setdefault(key, []).append(row)
            print(key, json.dumps(row), flush=True)

    lora = model.peft_config["default"]
    report = {
        "machine": machine_info(),
        "model": MODEL,
        "lora": {"r": lora.r, "alpha": lora.lora_alpha, "target_modules": sorted(lora.target_modules),
                 "init": "warmup checkpoint" if args.checkpoint else "random (init_lora_weights=False)"},
        "pool": len(pool),
        "targets": len(targets),
        "target_tasks": sorted(set(tasks)),
        "max_length": args.max_length,
        "D": total,
        "checkpoint": args.checkpoint,
        "exact": "cosine of unreduced LoRA gradients",
        "aggregation": "max over target tasks of the mean over the task's targets",
        "fitted_on": "pca and kron-pca are fitted on the pool's own gradients (in-sample)",
        "results": results,
        "skipped": skipped,
        "command": shlex.join(["python", "benchmarks/influence_fidelity.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
