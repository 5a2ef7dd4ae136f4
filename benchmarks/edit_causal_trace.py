"""Which MLP layers recall a subject's facts in the embedded default? Causal tracing, to choose MEMIT's layers.

Takes the dev edit records whose true answer the unedited model states in its greedy reply (ROME traces known
facts only), up to `--facts`, and traces each (`trustray.core.editing.causal_trace`) on the chat prompt plus its
reply up to the answer: the subject's embeddings (every occurrence) are corrupted with noise, and each layer's
window of MLP outputs at the subject's last token is restored. Reports per layer the mean indirect effect
p(restored) − p(corrupted) on the answer's first token with a 95% bootstrap interval over facts, and the
`--memit-layers` consecutive layers from `--lowest-layer` up with the largest summed effect: the range MEMIT edits
(`configs/eval_edit/cpu.yaml`). Writes benchmarks/results/edit_causal_trace.json with the machine.

Layer 0 is left out of the range by default: its MLP works on the token embedding itself, and MEMIT's published
ranges (GPT-J 3–8, GPT-2 XL 13–17) start well above it. A window of 1 restores one layer at a time; a wider one
smears the edge layers' effect onto their neighbours (with 5, layers 0–2 all looked strongest).
Run: .venv/bin/python benchmarks/edit_causal_trace.py [--facts 100] [--samples 5] [--window 1] [--memit-layers 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trustray.artifacts import atomic_write_text
from trustray.core.editing.causal_trace import best_window, trace_prompt
from trustray.core.editing.memit import PromptPositions
from trustray.core.stats import bootstrap_ci
from trustray.data.edits import load_edit_split
from trustray.models.engines import EngineConfig
from trustray.models.hf_engine import HFEngine
from trustray.models.sources import DEFAULT_CHAT_MODEL
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "edit_causal_trace.json"


@torch.no_grad()
def known_facts(model, tokenizer, records: list[dict], limit: int, max_new_tokens: int = 24,
                batch_size: int = 16) -> list[dict]:
    """Records whose `target_true` the model states in its greedy reply (≤ `limit`, in split order), each with
    `ids`: the chat prompt and the reply up to the answer, and `answer_token`: the reply's next token there.

    A chat model rarely starts its reply with the bare answer ("Clark Gable died in 1960."), so the traced token
    is where the answer begins inside the model's own reply."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    known = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [PromptPositions(tokenizer, record["prompt"]) for record in chunk]
        width = max(len(p.ids) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in prompts])
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts])
        output = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad)
        for record, positions, row in zip(chunk, prompts, output[:, width:].tolist(), strict=True):
            reply = tokenizer.decode(row, skip_special_tokens=True)
            found = reply.lower().find(record["target_true"].lower())
            if found < 0:
                continue
            # The first reply token whose decoded prefix reaches into the answer.
            cut = next(k for k in range(len(row)) if len(tokenizer.decode(row[: k + 1], skip_special_tokens=True)) > found)
            known.append({**record, "ids": positions.ids + row[:cut], "answer_token": row[cut],
                          "prompt_tokens": len(positions.ids), "reply": reply})
        if len(known) >= limit:
            break
    return known[:limit]


def subject_tokens(tokenizer, ids: list[int], subject: str) -> list[int]:
    """Positions in `ids` of every token overlapping an occurrence of `subject` (in the prompt and the reply)."""
    text, offsets, position = "", [], 0
    for token in ids:
        piece = tokenizer.decode([token])
        offsets.append((position, position + len(piece)))
        text += piece
        position += len(piece)
    spans = [(m, m + len(subject)) for m in range(len(text)) if text.startswith(subject, m)]
    return [i for i, (a, b) in enumerate(offsets) if any(a < end and b > begin for begin, end in spans)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=5, help="noise draws per fact")
    parser.add_argument("--window", type=int, default=1, help="MLP layers restored around each layer")
    parser.add_argument("--noise-scale", type=float, default=3.0, help="noise std in embedding std units")
    parser.add_argument("--memit-layers", type=int, default=5, help="size of the chosen layer range")
    parser.add_argument("--lowest-layer", type=int, default=1,
                        help="lowest layer the range may start at (layer 0's MLP acts on the token embedding)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--scan", type=int, default=400, help="records whose greedy replies are searched for known facts")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(2)
    engine = HFEngine(EngineConfig(model=DEFAULT_CHAT_MODEL, dtype="float32"), device="cpu")
    model, tokenizer = engine.model, engine.tokenizer
    records = known_facts(model, tokenizer, load_edit_split(args.split)[: args.scan], args.facts)
    if not records:
        raise SystemExit(f"the model states none of the first {args.scan} {args.split} records' true answers")
    generator = torch.Generator().manual_seed(0)
    traces, skipped = [], 0
    for record in records:
        subject = subject_tokens(tokenizer, record["ids"], record["subject"])
        if not subject:
            skipped += 1
            continue
        traces.append(trace_prompt(model, record["ids"], subject, record["answer_token"], args.noise_scale,
                                   args.samples, args.window, generator))
    if skipped:
        print(f"{skipped} facts skipped: their subject is not found in the decoded tokens")
    effects = torch.stack([trace["restored"] - trace["corrupted"] for trace in traces])  # [facts, layers]
    mean = effects.mean(dim=0)
    layers = []
    for layer in range(effects.shape[1]):
        low, high = bootstrap_ci(effects[:, layer].tolist())
        layers.append({"layer": layer, "indirect_effect": round(float(mean[layer]), 4),
                       "ci": [round(low, 4), round(high, 4)]})
    chosen = [args.lowest_layer + layer for layer in best_window(mean[args.lowest_layer :], args.memit_layers)]
    report = {
        "model": DEFAULT_CHAT_MODEL, "split": args.split, "scanned": min(args.scan, len(load_edit_split(args.split))),
        "known": len(records), "facts": len(traces), "samples": args.samples,
        "window": args.window, "noise_scale": args.noise_scale, "lowest_layer": args.lowest_layer,
        "machine": machine_info(),
        "clean": round(sum(t["clean"] for t in traces) / len(traces), 4),
        "corrupted": round(sum(t["corrupted"] for t in traces) / len(traces), 4),
        "layers": layers, "memit_layers": chosen,
    }
    atomic_write_text(RESULT, json.dumps(report, indent=2) + "\n")
    print(f"{len(traces)} known facts: p(answer) clean {report['clean']:.3f}, subject corrupted {report['corrupted']:.3f}")
    for row in layers:
        print(f"layer {row['layer']:2d}  indirect effect {row['indirect_effect']:+.4f}  [{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}]")
    print(f"MEMIT layers (largest summed effect over {args.memit_layers}): {chosen}")
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
