"""How much accuracy is kept at what fraction of the tokens? Compressed retrieval on the dev split.

Runs `trustray eval rag` with configs/eval_rag/compress_<preset>.yaml (no retrieval, full top-k, truncate, the
untrained and the LSR-trained extractive compressor, the distilled abstractive one), then the same with `irrelevant` random passages mixed into
each top-k (robustness), and writes benchmarks/results/compression_eval.json: rows {method, em, f1, contains,
tokens_in, compression, p50_ms, p95_ms, run} (run: "clean" or "irrelevant"), plus the machine and both summaries.
Run: .venv/bin/python benchmarks/compression_eval.py [--preset cpu] [--irrelevant 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trustray.artifacts import atomic_write_text
from trustray.config import load_config
from trustray.pipelines import eval_rag
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "compression_eval.json"
COLUMNS = ("em", "f1", "contains", "tokens_in", "compression", "p50_ms", "p95_ms")


def rows(summary: dict, run: str) -> list[dict]:
    return [{"method": condition, **{key: summary[condition].get(key) for key in COLUMNS}, "run": run}
            for condition in summary["conditions"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=["cpu"])
    parser.add_argument("--irrelevant", type=int, default=2, help="random passages mixed in for the robustness run")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    preset = ROOT / "configs" / "eval_rag" / f"compress_{args.preset}.yaml"
    summaries = {}
    for run, extra in (("clean", []), ("irrelevant", [f"irrelevant={args.irrelevant}"])):
        config = load_config(eval_rag.EvalRagConfig, preset, [*args.overrides, *extra, f"name=compression_eval_{run}"])
        summaries[run] = eval_rag.run(config)
        print(eval_rag.format_table(summaries[run]))
    report = {"machine": machine_info(), "rows": [row for run, s in summaries.items() for row in rows(s, run)],
              "summaries": summaries}
    atomic_write_text(RESULT, json.dumps(report, indent=2) + "\n")
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
