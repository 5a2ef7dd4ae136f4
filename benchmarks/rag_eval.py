"""Closed book vs RAG on the 46-question dev split with the embedded default model.

Builds (or reuses) the cpu-preset index, runs `trustray eval rag` with the cpu preset, and writes
benchmarks/results/rag_eval_dev.json (keys `closed_book` and `rag`, each with em/f1/contains, plus the machine).
Run: .venv/bin/python benchmarks/rag_eval.py [--preset cpu] [key=value ...] (latency_questions=0 when other jobs
share the machine: quality only)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trustray.artifacts import atomic_write_text
from trustray.config import load_config
from trustray.pipelines import build_index, eval_rag
from trustray.runtime import apply_offline_defaults, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "rag_eval_dev.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="eval_rag overrides, e.g. latency_questions=0")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    index_config = load_config(build_index.BuildIndexConfig, ROOT / f"configs/build_index/{args.preset}.yaml")
    index_dir = build_index.run(index_config)
    summary = eval_rag.run(
        load_config(
            eval_rag.EvalRagConfig,
            ROOT / f"configs/eval_rag/{args.preset}.yaml",
            [f"index_dir={index_dir}", f"name=rag_eval_{args.preset}", *args.overrides],
        )
    )
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    summary["rag_minus_closed_book_contains_points"] = 100 * (summary["rag"]["contains"] - summary["closed_book"]["contains"])
    atomic_write_text(RESULT, json.dumps(summary, indent=2) + "\n")
    print(eval_rag.format_table(summary))
    print(f"RAG - closed book (contains): {summary['rag_minus_closed_book_contains_points']:+.1f} points -> {RESULT}")


if __name__ == "__main__":
    main()
