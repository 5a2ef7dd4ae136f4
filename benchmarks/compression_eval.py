"""Compressed retrieval against the best uncompressed setting, tuned on one part of the evaluation set and reported
on the other (`trustray.data.rag_eval`).

Stages, each a `trustray eval rag` run kept under outputs/benchmarks/compression_eval/<stage>/ and reused when a
rerun asks for the same config (a crash loses only the stage in flight):

1. `tune-baselines` (rag_eval_tune): closed book, uncompressed top-1/3/5. Top-1's mean context tokens there, T1,
   set the two budgets: T1 ("at top-1's tokens") and T1 // 2 ("half").
2. `tune-compressors` (rag_eval_tune): truncate, extractive untrained, extractive LSR and abstractive (distilled)
   over the top 5 at T1, both extractive ones at T1 // 2 too, the LSR one over the top 10 at T1; top-1 again as
   the paired reference.
3. `report-clean` (rag_eval_report): every condition of 1 and 2 at the budgets chosen in 1, with latency (the first
   `--latency-questions` questions one at a time).
4. `report-irrelevant`: the same report questions with `--irrelevant` random passages mixed into each condition's
   passages (robustness), top-1/top-5 uncompressed and the compressors at T1.

Writes benchmarks/results/compression_eval.json: rows {method, top_k, budget, split, run, n_questions, contains,
contains_ci, tokens_in, context_tokens, p50_ms, p95_ms, contains_minus_top1, by_source, ...}, the budgets and where
they were chosen, recall@k, the machine. Needs the cpu index, `trustray run compressor_train --config
configs/compressor_train/cpu.yaml` and `trustray run abstractive_train --config configs/abstractive_train/cpu.yaml`.
Run: .venv/bin/python benchmarks/compression_eval.py [--latency-questions 32] [--irrelevant 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from trustray.artifacts import atomic_write_text
from trustray.config import load_config
from trustray.pipelines import eval_rag
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

logger = logging.getLogger("compression_eval")
ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "compression_eval.json"
PRESET = ROOT / "configs" / "eval_rag" / "compress_cpu.yaml"
STAGES_ROOT = ROOT / "outputs" / "benchmarks" / "compression_eval"
BASELINES = ["closed_book", "rag@1", "rag@3", "rag@5"]
STAGES = ("tune-baselines", "tune-compressors", "report-clean", "report-irrelevant")
SCORER_DIR = "outputs/compressor_train/cpu/compressor"
SUMMARIZER_DIR = "outputs/abstractive_train/cpu/summarizer"
COLUMNS = ("em", "f1", "contains", "contains_ci", "tokens_in", "context_tokens", "context_kept", "empty_rate",
           "p50_ms", "p95_ms", "by_source", "batched_answers_differing")


def compressors(budgets: dict[str, int], which: tuple[str, ...]) -> list[dict[str, Any]]:
    """The compressor conditions at the named budgets (labels carry method, k and budget name): every method over
    the top 5 at T1; the extractive ones at half of it too; the LSR one over the top 10 at T1."""
    plan = [("truncate", {"name": "truncate"}, 5, "T1"),
            ("extractive-untrained", {"name": "extractive"}, 5, "T1"),
            ("extractive-untrained", {"name": "extractive"}, 5, "half"),
            ("extractive+lsr", {"name": "extractive", "scorer_dir": SCORER_DIR}, 5, "T1"),
            ("extractive+lsr", {"name": "extractive", "scorer_dir": SCORER_DIR}, 5, "half"),
            ("extractive+lsr", {"name": "extractive", "scorer_dir": SCORER_DIR}, 10, "T1"),
            ("abstractive+distilled", {"name": "abstractive", "summarizer_dir": SUMMARIZER_DIR}, 5, "T1")]
    return [{**settings, "top_k": k, "budget": budgets[budget], "label": f"{method}@{k}/{budget}"}
            for method, settings, k, budget in plan if budget in which]


def stage(name: str, overrides: list[str], extra: list[str]) -> dict[str, Any]:
    """One `trustray eval rag` run, reused when its folder holds a summary of the same config."""
    folder = STAGES_ROOT / name
    config = load_config(eval_rag.EvalRagConfig, PRESET, [*extra, *overrides, f"output_dir={folder}", f"name={name}"])
    written = folder / eval_rag.SUMMARY_FILE
    if written.is_file():
        summary = json.loads(written.read_text())
        if summary.get("config") == config.model_dump(mode="json"):
            logger.info("stage %s: reusing %s", name, written)
            return summary
    summary = eval_rag.run(config)
    print(eval_rag.format_table(summary))
    return summary


def rows(summary: dict[str, Any], split: str, run: str) -> list[dict[str, Any]]:
    out = []
    settings = {c["label"]: c for c in summary["config"]["compressors"]}
    for condition in summary["conditions"]:
        metrics = summary[condition]
        setting = settings.get(condition)
        method = condition.split("@")[0]
        out.append({"condition": condition, "method": method, "top_k": metrics["top_k"],
                    "budget": setting["budget"] if setting else None, "split": split, "run": run,
                    "n_questions": summary["n_questions"],
                    **{key: metrics.get(key) for key in COLUMNS},
                    "contains_minus_top1": metrics.get("contains_minus_reference")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--irrelevant", type=int, default=2, help="random passages mixed in for the robustness run")
    parser.add_argument("--latency-questions", type=int, default=32, help="report questions also timed alone")
    parser.add_argument("--until", choices=STAGES, help="stop after this stage (the rest runs on a later call)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    quality_only = ["latency_questions=0", "reference=rag@1"]

    baselines = stage("tune-baselines", args.overrides,
                      ["qa=rag_eval_tune", f"modes={BASELINES}", "compressors=[]", *quality_only])
    if args.until == "tune-baselines":
        return
    top1_tokens = baselines["rag@1"]["context_tokens"]
    budgets = {"T1": int(top1_tokens), "half": int(top1_tokens) // 2}
    logger.info("budgets from the tuning part's top-1 context tokens (%.1f): %s", top1_tokens, budgets)
    all_compressors = compressors(budgets, ("T1", "half"))
    tuned = stage("tune-compressors", args.overrides,
                  ["qa=rag_eval_tune", "modes=[rag@1]", f"compressors={json.dumps(all_compressors)}", *quality_only])
    if args.until == "tune-compressors":
        return
    clean = stage("report-clean", args.overrides,
                  ["qa=rag_eval_report", f"modes={BASELINES}", f"compressors={json.dumps(all_compressors)}",
                   f"latency_questions={args.latency_questions}", "reference=rag@1"])
    if args.until == "report-clean":
        return
    noisy = stage("report-irrelevant", args.overrides,
                  ["qa=rag_eval_report", "modes=[rag@1, rag@5]", f"irrelevant={args.irrelevant}",
                   f"compressors={json.dumps([c for c in compressors(budgets, ('T1',)) if c['top_k'] == 5])}",
                   "latency_questions=0", "reference=rag@1"])

    report = {
        "machine": machine_info(),
        "budgets": budgets, "budgets_chosen_on": "rag_eval_tune (top-1 uncompressed context tokens)",
        "top1_context_tokens_tune": top1_tokens,
        "recall": {"tune": baselines["recall"], "report": clean["recall"]},
        "irrelevant": args.irrelevant, "latency_questions": args.latency_questions,
        "rows": [*rows(baselines, "tune", "clean"), *[r for r in rows(tuned, "tune", "clean") if r["method"] != "rag"],
                 *rows(clean, "report", "clean"), *rows(noisy, "report", "irrelevant")],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    atomic_write_text(RESULT, json.dumps(report, indent=2) + "\n")
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
