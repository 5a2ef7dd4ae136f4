"""Fidelity, LDS and selection of reduced LoRA-gradient influence on the embedded default.

Runs `trustray eval influence` with a preset (default cpu) and copies its report into benchmarks/results:
influence_fidelity.json (per reduction: {dim, features, spearman, top1_overlap, top5_overlap}),
influence_lds.json ({reduction, dim, features, metric, lds} rows), influence_selection.json (target loss per
selection) and the three PNG plots. Every file names the machine.
Run: .venv/bin/python benchmarks/influence_eval.py [--preset cpu] [key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trustray.pipelines import run_module
from trustray.pipelines.eval_influence_report import format_table

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=["tiny", "cpu", "gpu"])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    config = ROOT / "configs" / "eval_influence" / f"{args.preset}.yaml"
    summary = run_module(
        "eval_influence", ["--config", str(config), f"results_dir={ROOT / 'benchmarks' / 'results'}", *args.overrides],
        log_table=False,
    )
    print(format_table(summary))


if __name__ == "__main__":
    main()
