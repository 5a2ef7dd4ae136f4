"""Compressed retrieval against the best uncompressed setting, tuned on one part of the evaluation set and reported
on the other (`trustray.data.rag_eval`).

Stages, each a `trustray eval rag` run kept under outputs/benchmarks/compression_eval/<stage>/ and reused when a
rerun asks for the same config (a crash loses only the stage in flight):

1. `tune-baselines` (rag_eval_tune): closed book, uncompressed top-1/3/5. Top-1's mean context tokens there, T1,
   set the two budgets: T1 ("at top-1's tokens") and T1 // 2 ("half").
2. `tune-extractive`, `tune-abstractive` (rag_eval_tune): truncate, extractive untrained, extractive LSR and
   abstractive (distilled) over the top 5 at T1, the LSR one at T1 // 2 too and over the top 10 at T1; each is
   compared with stage 1's top-1 answers (paired). The served setting is chosen from these.
3. `report-baselines`, `report-compressors` (rag_eval_report): every condition of 1 and 2 at the budgets chosen
   in 1, compared with top-1 as in 2.
4. `report-irrelevant`: the same report questions with `--irrelevant` random passages mixed into each condition's
   passages (robustness): top-5 uncompressed and both extractive compressors at T1 over the top 5, each losing
   what it loses against its own clean run.
5. `report-latency`: the first `--latency-questions` report questions again, every condition answering them one
   at a time, conditions taking turns: p50/p95 latency. Quality stages batch their questions and may share the
   machine; run this one alone on it.

Writes benchmarks/results/compression_eval.json: rows {method, top_k, budget, split, run, n_questions, contains,
contains_ci, tokens_in, context_tokens, p50_ms, p95_ms, reference, contains_minus_reference, by_source, and in the
robustness run contains_minus_clean ...}, the budgets and where
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
STAGES = ("tune-baselines", "tune-extractive", "tune-abstractive", "tune-untrained-half", "report-baselines",
          "report-compressors", "report-irrelevant", "report-latency")
SCORER_DIR = "outputs/compressor_train/cpu/compressor"
SUMMARIZER_DIR = "outputs/abstractive_train/cpu/summarizer"
COLUMNS = ("em", "f1", "contains", "contains_ci", "tokens_in", "context_tokens", "context_kept", "empty_rate",
           "p50_ms", "p95_ms", "by_source")


def compressors(budgets: dict[str, int], which: tuple[str, ...]) -> list[dict[str, Any]]:
    """The compressor conditions at the named budgets (labels carry method, k and budget name): every method over
    the top 5 at T1; the LSR one at half of it too, and over the top 10 at T1."""
    plan = [("truncate", {"name": "truncate"}, 5, "T1"),
            ("extractive-untrained", {"name": "extractive"}, 5, "T1"),
            ("extractive+lsr", {"name": "extractive", "scorer_dir": SCORER_DIR}, 5, "T1"),
            ("extractive+lsr", {"name": "extractive", "scorer_dir": SCORER_DIR}, 5, "half"),
            ("extractive+lsr", {"name": "extractive", "scorer_dir": SCORER_DIR}, 10, "T1"),
            ("abstractive+distilled", {"name": "abstractive", "summarizer_dir": SUMMARIZER_DIR}, 5, "T1")]
    return [{**settings, "top_k": k, "budget": budgets[budget], "label": f"{method}@{k}/{budget}"}
            for method, settings, k, budget in plan if budget in which]


def stage_config(name: str, overrides: list[str], extra: list[str]) -> eval_rag.EvalRagConfig:
    folder = STAGES_ROOT / name
    return load_config(eval_rag.EvalRagConfig, PRESET, [*extra, *overrides, f"output_dir={folder}", f"name={name}"])


def finished_stage(name: str, overrides: list[str], extra: list[str]) -> dict[str, Any] | None:
    """The stage's summary when its folder holds one of the same config, else None."""
    config = stage_config(name, overrides, extra)
    written = config.output_path() / eval_rag.SUMMARY_FILE
    if written.is_file():
        summary = json.loads(written.read_text())
        if summary.get("config") == config.model_dump(mode="json"):
            return summary
    return None


def partial_stage(name: str, overrides: list[str], extra: list[str]) -> dict[str, Any] | None:
    """An unfinished stage's summary over the conditions whose answers were kept (their `eval rag` run reuses
    them), or None when it has none; the summary says which conditions are missing."""
    config = stage_config(name, overrides, extra)
    kept = [c for c in eval_rag.depths(config)
            if eval_rag.answers_file(config.output_path(), config, c).is_file()]
    if not kept:
        return None
    reduced = config.model_copy(update={
        "modes": [m for m in config.modes if m in kept],
        "compressors": [c for c in config.compressors if eval_rag.label(c) in kept],
        "reference": config.reference if config.reference in kept else None, "latency_questions": 0})
    summary = eval_rag.run(reduced)
    missing = [c for c in eval_rag.depths(config) if c not in kept]
    if missing:  # with none missing, the run above finished the stage (its summary is the whole stage's)
        summary["conditions_missing"] = missing
        logger.warning("stage %s is unfinished: %d conditions kept, missing %s", name, len(kept), missing)
    return summary


def stage(name: str, overrides: list[str], extra: list[str]) -> dict[str, Any]:
    """One `trustray eval rag` run, reused when its folder holds a summary of the same config."""
    summary = finished_stage(name, overrides, extra)
    if summary is not None:
        logger.info("stage %s: reusing %s", name, STAGES_ROOT / name)
        return summary
    summary = eval_rag.run(stage_config(name, overrides, extra))
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
                    # Only a stage that answered questions one at a time compared them with the batched answers.
                    "batched_answers_differing": metrics.get("batched_answers_differing") if summary["latency_questions"]
                    else None,
                    "reference": summary.get("reference"),
                    "contains_minus_reference": metrics.get("contains_minus_reference")})
    return out


def contained(summary: dict[str, Any], condition: str) -> dict[str, float]:
    """Per question id, whether `condition`'s answer contained a gold answer (from the stage's per-question file)."""
    lines = (Path(summary["output_dir"]) / eval_rag.QUESTIONS_FILE).read_text().splitlines()
    return {row["id"]: row[condition]["contains"] for row in map(json.loads, lines)}


def paired(first: dict[str, Any], condition: str, second: dict[str, Any], other: str, seed: int) -> dict[str, Any]:
    """`condition` of stage `first` minus `other` of stage `second` on the same questions, paired bootstrap."""
    from trustray.core.stats import paired_difference

    mine, theirs = contained(first, condition), contained(second, other)
    if mine.keys() != theirs.keys():
        raise ValueError(f"{condition} and {other}: the stages answered different questions")
    return paired_difference([mine[qid] for qid in theirs], list(theirs.values()), seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--irrelevant", type=int, default=2, help="random passages mixed in for the robustness run")
    parser.add_argument("--latency-questions", type=int, default=32, help="report questions also timed alone")
    parser.add_argument("--until", choices=STAGES, help="stop after this stage (the rest runs on a later call)")
    parser.add_argument("--only", choices=STAGES[1:], help="run just this stage (after tune-baselines); several "
                        "stages can run at once as separate processes")
    parser.add_argument("--assemble", action="store_true", help="write the results file from what is finished, "
                        "answering no question: whole stages, and of an unfinished stage the conditions whose answers "
                        "were kept (what is missing is listed in it)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    quality_only = ["latency_questions=0", "reference=rag@1"]
    done: dict[str, dict[str, Any]] = {}

    def run_stage(name: str, extra: list[str]) -> bool:
        """Run (or reuse) a stage; False once `--until` (or the `--only` stage) has been reached."""
        if args.only not in (None, name) and name != "tune-baselines":
            return True
        if args.assemble:
            found = finished_stage(name, args.overrides, extra) or partial_stage(name, args.overrides, extra)
            if found is not None:
                done[name] = found
            return True
        done[name] = stage(name, args.overrides, extra)
        return name not in (args.until, args.only)

    if not run_stage("tune-baselines", ["qa=rag_eval_tune", f"modes={BASELINES}", "compressors=[]", *quality_only]):
        return
    top1_tokens = done["tune-baselines"]["rag@1"]["context_tokens"]
    budgets = {"T1": int(top1_tokens), "half": int(top1_tokens) // 2}
    logger.info("budgets from the tuning part's top-1 context tokens (%.1f): %s", top1_tokens, budgets)
    base = compressors(budgets, ("T1", "half"))
    extractive = [c for c in base if c["name"] != "abstractive"]
    # Added after tune-extractive showed half the budget beating T1: is the training what makes it good there?
    untrained_half = [{"name": "extractive", "top_k": 5, "budget": budgets["half"],
                       "label": "extractive-untrained@5/half"}]
    every = [*base, *untrained_half]
    abstractive = [c for c in every if c["name"] == "abstractive"]
    report = ["qa=rag_eval_report", f"modes={BASELINES}", f"compressors={json.dumps(every)}"]
    # On the reporting part the conditions the targets name come first (each is kept as it finishes).
    first = ("extractive+lsr@5/T1", "extractive-untrained@5/T1", "extractive+lsr@5/half", "extractive-untrained@5/half")
    report_order = sorted(every, key=lambda c: (c["label"] not in first, first.index(c["label"]) if c["label"] in first
                                                else 0))
    robust = [c for c in report_order if c["top_k"] == 5 and c["budget"] == budgets["T1"] and c["name"] == "extractive"]
    # Compressor stages compare with their part's baseline top-1 answers (the same questions in the same batches).
    tune = ["qa=rag_eval_tune", "modes=[]", "latency_questions=0", "reference=null"]
    plan = [
        ("tune-extractive", [*tune, f"compressors={json.dumps(extractive)}"]),
        ("tune-abstractive", [*tune, f"compressors={json.dumps(abstractive)}"]),
        ("tune-untrained-half", [*tune, f"compressors={json.dumps(untrained_half)}"]),
        ("report-baselines", ["qa=rag_eval_report", f"modes={BASELINES}", "compressors=[]", *quality_only]),
        ("report-compressors", ["qa=rag_eval_report", "modes=[]", "latency_questions=0", "reference=null",
                                f"compressors={json.dumps(report_order)}"]),
        ("report-irrelevant", ["qa=rag_eval_report", "modes=[rag@5]", f"irrelevant={args.irrelevant}",
                               f"compressors={json.dumps(robust)}", "latency_questions=0", "reference=rag@5"]),
        # Last and alone on the machine: the first questions again, each condition timed one question at a time.
        ("report-latency", [*report, f"limit={args.latency_questions}",
                            f"latency_questions={args.latency_questions}", "reference=rag@1"]),
    ]
    for name, extra in plan:
        if not run_stage(name, extra):
            return

    missing = [name for name in STAGES if name not in done]
    unfinished = {name: summary["conditions_missing"] for name, summary in done.items() if "conditions_missing" in summary}
    if missing:
        logger.warning("stages not finished yet: %s (their rows are missing)", missing)
    compared_with = {"tune-extractive": "tune-baselines", "tune-abstractive": "tune-baselines",
                     "tune-untrained-half": "tune-baselines", "report-compressors": "report-baselines"}
    for name, baselines in compared_with.items():
        if name in done and baselines in done:
            for condition in done[name]["conditions"]:
                done[name][condition]["contains_minus_reference"] = paired(
                    done[name], condition, done[baselines], "rag@1", done[name]["config"]["seed"])
            done[name]["reference"] = "rag@1"
    noisy_rows = rows(done["report-irrelevant"], "report", "irrelevant") if "report-irrelevant" in done else []
    for row in noisy_rows:  # what mixing in irrelevant passages cost each condition, on the same questions
        clean = next((done[name] for name in ("report-baselines", "report-compressors")
                      if name in done and row["condition"] in done[name]["conditions"]), None)
        if clean is not None:
            row["contains_minus_clean"] = paired(done["report-irrelevant"], row["condition"], clean, row["condition"],
                                                 done["report-irrelevant"]["config"]["seed"])
    clean_rows = [row for name in ("report-baselines", "report-compressors") if name in done
                  for row in rows(done[name], "report", "clean")]
    latency = done.get("report-latency")
    for row in clean_rows:
        timed = latency[row["condition"]] if latency else {}
        row.update(p50_ms=timed.get("p50_ms"), p95_ms=timed.get("p95_ms"),
                   batched_answers_differing=timed.get("batched_answers_differing"))
    tuned = [row for name in ("tune-extractive", "tune-abstractive", "tune-untrained-half") if name in done
             for row in rows(done[name], "tune", "clean")]
    # What the training buys: the LSR-trained minus the untrained scorer, paired, wherever both answered.
    # The latency stage answers only the first questions again: the quality stages hold the whole parts.
    holder = {(summary["qa"], condition): summary for name, summary in done.items()
              if name not in ("report-irrelevant", "report-latency") for condition in summary["conditions"]}
    lsr_minus_untrained = {}
    for part in ("tune", "report"):
        for budget in ("T1", "half"):
            trained, untrained = f"extractive+lsr@5/{budget}", f"extractive-untrained@5/{budget}"
            first_stage = holder.get((f"rag_eval_{part}", trained))
            second_stage = holder.get((f"rag_eval_{part}", untrained))
            if first_stage and second_stage:
                lsr_minus_untrained[f"{part}/{budget}"] = paired(first_stage, trained, second_stage, untrained,
                                                                  first_stage["config"]["seed"])
    baseline = done["tune-baselines"]
    result = {
        "machine": machine_info(),
        "stages_missing": missing, "conditions_missing": unfinished, "lsr_minus_untrained": lsr_minus_untrained,
        "budgets": budgets, "budgets_chosen_on": "rag_eval_tune (top-1 uncompressed context tokens)",
        "top1_context_tokens_tune": top1_tokens,
        "recall": {"tune": done["tune-baselines"]["recall"],
                   "report": done["report-baselines"]["recall"] if "report-baselines" in done else None},
        "irrelevant": args.irrelevant, "latency_questions": args.latency_questions,
        "chat_model": baseline["chat_model"], "embedder": baseline["embedder"], "max_tokens": baseline["max_tokens"],
        "rows": [*rows(done["tune-baselines"], "tune", "clean"), *tuned, *clean_rows,
                 *noisy_rows],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    atomic_write_text(RESULT, json.dumps(result, indent=2) + "\n")
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
