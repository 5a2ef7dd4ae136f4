"""Throughput of the influence feature stage: batched per-example LoRA gradients + a reduction, against a plain
LoRA training step (forward + backward, batch-mean loss, no optimizer) and a batch-size-1 gradient loop, on the
same random-weight Llama-shaped model and the same batches in one process.

    python benchmarks/influence_throughput.py --device cuda                       # 135m and 1.1b, seq 512, bf16
    python benchmarks/influence_throughput.py --device cpu --models 135m --seq-len 128 --batch-size 8

Random right-padded batches (lengths between half and all of --seq-len, the first quarter of each example is an
unlabelled prompt). Warm-up iterations are excluded; CUDA work is synchronized before each clock read. Each
stage's time includes moving the features to host memory. The loop baseline computes gradients only (its
reduction cost is not counted, which favours the loop). Runs are merged into
benchmarks/results/influence_throughput.json, replacing earlier runs with the same settings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from trustray.core.influence.gradients import per_example_gradients, per_example_gradients_loop
from trustray.core.influence.reductions import build_reduction
from trustray.runtime import apply_offline_defaults, machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "influence_throughput.json"
SHAPES = {
    # SmolLM2-135M and TinyLlama-1.1B shapes.
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True},
    "1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "intermediate_size": 5632, "vocab_size": 32000, "tie_word_embeddings": False},
}


def build_model(shape: str, rank: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, lora).eval()


def make_batches(count: int, batch_size: int, seq_len: int, vocab: int, device: str, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=generator)
        positions = torch.arange(seq_len)
        attention_mask = (positions < lengths[:, None]).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100).masked_fill(positions < lengths[:, None] // 4, -100)
        batches.append({k: v.to(device) for k, v in
                        {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}.items()})
    return batches


def timed(fn: Callable[[dict], object], batches: list[dict], warmup: int, device: str) -> float:
    """Examples per second of `fn` over `batches[warmup:]`, after untimed calls on `batches[:warmup]`."""
    for batch in batches[:warmup]:
        fn(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        fn(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return sum(b["input_ids"].shape[0] for b in batches[warmup:]) / (time.perf_counter() - start)


def training_step(model: torch.nn.Module) -> Callable[[dict], None]:
    def step(batch: dict) -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def feature_stage(model: torch.nn.Module, reduction) -> Callable[[dict], torch.Tensor]:
    def features(batch: dict) -> torch.Tensor:
        return reduction.transform(per_example_gradients(model, batch)).cpu()
    return features


def parse_reduction(spec: str) -> tuple[str, int | None]:
    name, _, dim = spec.partition(":")
    return name, int(dim) if dim else None


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
    keys = ("model", "device", "dtype", "seq_len", "batch_size", "lora_rank", "reduction")
    replaced = {tuple(run[k] for k in keys) for run in new}
    return [run for run in old if tuple(run.get(k) for k in keys) not in replaced] + new


def main(argv: list[str] | None = None) -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help="comma list of 135m,1.1b (default: both on cuda, 135m on cpu)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 on cuda, 128 on cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 on cuda, 8 on cpu")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on q/k/v/o (LESS uses 128)")
    parser.add_argument("--reductions", default="none,gaussian:8192",
                        help="comma list of name[:dim], e.g. none,gaussian:8192,sjlt:8192,kron:8192")
    parser.add_argument("--batches", type=int, default=None, help="measured batches per stage (default 10 cuda, 2 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per stage (default 3 cuda, 1 cpu)")
    parser.add_argument("--loop-batches", type=int, default=1, help="batches for the batch-size-1 loop baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    cuda = args.device == "cuda"
    models = (args.models or ("135m,1.1b" if cuda else "135m")).split(",")
    seq_len = args.seq_len or (512 if cuda else 128)
    batch_size = args.batch_size or (16 if cuda else 8)
    measured = args.batches or (10 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    runs = []
    for shape in models:
        model = build_model(shape, args.lora_rank, args.device, dtype)
        batches = make_batches(warmup + measured, batch_size, seq_len, SHAPES[shape]["vocab_size"], args.device)
        step_rate = timed(training_step(model), batches, warmup, args.device)
        loop_batches = batches[warmup : warmup + args.loop_batches]
        # The model is already warm from the training-step stage.
        loop_rate = timed(partial(per_example_gradients_loop, model), loop_batches, 0, args.device)
        print(f"{shape}: training step {step_rate:.2f} ex/s, batch-size-1 loop {loop_rate:.2f} ex/s", flush=True)
        for spec in args.reductions.split(","):
            name, dim = parse_reduction(spec)
            options = {"generator_device": args.device} if name in ("gaussian", "rademacher") else {}
            reduction = build_reduction(name, dim, seed=0, **options)
            if reduction.fitted:
                reduction.fit([per_example_gradients(model, batch) for batch in batches[:warmup + 1]])
            rate = timed(feature_stage(model, reduction), batches, warmup, args.device)
            run = {
                "model": shape, "device": args.device, "dtype": str(dtype).removeprefix("torch."), "seq_len": seq_len,
                "batch_size": batch_size, "lora_rank": args.lora_rank, "reduction": spec,
                "ratio_vs_step": round(rate / step_rate, 3), "ratio_vs_loop": round(rate / loop_rate, 3),
                "examples_per_s": round(rate, 3), "step_examples_per_s": round(step_rate, 3),
                "loop_examples_per_s": round(loop_rate, 3), "gradient_dim": reduction.input_dim,
                "feature_dim": reduction.dim, "bytes_per_example": 4 * reduction.dim,
                "measured_batches": measured, "warmup_batches": warmup, "threads": torch.get_num_threads(),
                "gpu": machine_info()["gpu"], "command": command,
            }
            print(json.dumps(run), flush=True)
            runs.append(run)
        del model, batches
        if cuda:
            torch.cuda.empty_cache()

    old = json.loads(args.output.read_text())["runs"] if args.output.is_file() else []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine_info(), "runs": merge_runs(old, runs)}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
