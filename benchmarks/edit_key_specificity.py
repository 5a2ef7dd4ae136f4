"""Why same-relation locality is hard for an editor keyed on answer positions: how alike are the keys of two facts?

For dev edit records whose first locality probe has the same relation ("What is the occupation of Lope de Vega?"
next to "What is the occupation of Brian Eno?"), the inputs of every layer's MLP `down_proj` (the keys an editor
writes through) are taken at two positions of the chat prompt: the last one, which predicts the first answer token
(where MALMEN caches its keys), and the subject's last token (where MEMIT edits). A weight change written for one
key moves the other in proportion to their cosine. Per layer and position the script reports the mean cosine of an
edit's key with its own neighbour's (`cosine`), the same after subtracting the mean key of all those prompts
(`centered_cosine`), and the centered cosine with another record's neighbour (`centered_cosine_unrelated`, the
floor), plus `answer_over_subject`, the ratio of the two positions' cosines. Writes
benchmarks/results/edit_key_specificity.json with the machine.
Run: .venv/bin/python benchmarks/edit_key_specificity.py [--records 96] [--split dev]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trustray.artifacts import atomic_write_text
from trustray.data.edits import load_edit_split
from trustray.models.engines import EngineConfig
from trustray.models.hf_engine import HFEngine
from trustray.models.sources import DEFAULT_CHAT_MODEL
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "edit_key_specificity.json"
POSITIONS = ("answer", "subject")


def prompt_keys(model, tokenizer, prompt: str, subject: str) -> dict[str, torch.Tensor]:
    """`{position: [layers, intermediate]}`: every layer's down_proj input at the answer and subject positions."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    end = text.rindex(subject) + len(subject)
    subject_index = max(i for i, (start, stop) in enumerate(encoded["offset_mapping"]) if start < stop <= end)
    keys: list[torch.Tensor] = []
    handles = [layer.mlp.down_proj.register_forward_hook(lambda module, args, out: keys.append(args[0][0]))
               for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([encoded["input_ids"]]))
    finally:
        for handle in handles:
            handle.remove()
    stacked = torch.stack(keys)
    return {"answer": stacked[:, -1], "subject": stacked[:, subject_index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--split", default="dev")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(1)
    engine = HFEngine(EngineConfig(model=DEFAULT_CHAT_MODEL, dtype="float32"), device="cpu")
    records = [r for r in load_edit_split(args.split) if r["locality"][0]["relation"] == r["relation"]]
    records = records[: args.records]
    if len(records) < 2:
        raise SystemExit(f"only {len(records)} {args.split} records have a same-relation locality probe")
    edits = [prompt_keys(engine.model, engine.tokenizer, r["prompt"], r["subject"]) for r in records]
    neighbours = [prompt_keys(engine.model, engine.tokenizer, r["locality"][0]["prompt"], r["locality"][0]["subject"])
                  for r in records]
    layers = []
    for layer in range(edits[0]["answer"].shape[0]):
        row: dict[str, float | int] = {"layer": layer}
        for position in POSITIONS:
            edit = torch.stack([keys[position][layer] for keys in edits])
            neighbour = torch.stack([keys[position][layer] for keys in neighbours])
            mean = torch.cat([edit, neighbour]).mean(0)
            cosine = torch.nn.functional.cosine_similarity
            row[f"{position}_cosine"] = round(float(cosine(edit, neighbour).mean()), 4)
            row[f"{position}_centered_cosine"] = round(float(cosine(edit - mean, neighbour - mean).mean()), 4)
            row[f"{position}_centered_cosine_unrelated"] = round(
                float(cosine(edit - mean, (neighbour - mean).roll(1, 0)).mean()), 4)
        row["answer_over_subject"] = round(row["answer_cosine"] / row["subject_cosine"], 2)
        layers.append(row)
    report = {"model": DEFAULT_CHAT_MODEL, "split": args.split, "records": len(records), "machine": machine_info(),
              "layers": layers}
    atomic_write_text(RESULT, json.dumps(report, indent=2))
    for row in layers:
        print(f"layer {row['layer']:2d}  cosine answer {row['answer_cosine']:.2f}  subject {row['subject_cosine']:.2f}"
              f"  (centered {row['answer_centered_cosine']:.2f} / {row['subject_centered_cosine']:.2f})")
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
