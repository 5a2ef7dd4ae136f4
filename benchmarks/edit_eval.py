"""How many facts can be fixed at once, at what cost? The editing scaling curve on the embedded default.

Runs `trustray eval edit` with a preset (default cpu) and copies the report into benchmarks/results:
edit_scaling.json (rows {editor, n_edits, es, es_exact, gs, ls, ls_known, ls_gold_drawdown, offtemplate_agreement,
known_kept, ppl_ratio, seconds, peak_mem_mb, scored_records, ...}, the unedited baseline, the machine) and
edit_scaling.png. The cpu preset's meta-trained editors come first: `trustray run edit_train --config
configs/edit_train/cpu_scale.yaml` (cut at its newest checkpoint with `steps=K`) and `cpu_mend.yaml`. Rows are kept
as they finish and a rerun computes only the missing ones, so the grid can be run over several sessions;
`--report-only` copies a report of the rows computed so far (its `missing` lists the others) and computes none.
The rows of the published report of the same preset are taken in first (`rows_from`): a fresh machine, whose
outputs/ is empty, adds rows to the published grid instead of replacing it.
Run: .venv/bin/python benchmarks/edit_eval.py [--preset cpu] [--report-only] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trustray.pipelines import eval_edit, run_module

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=["tiny", "cpu", "gpu"])
    parser.add_argument("--report-only", action="store_true", help="Report the rows at hand; compute none.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.report_only:
        args.overrides.append("report_only=true")
    config = ROOT / "configs" / "eval_edit" / f"{args.preset}.yaml"
    published = ROOT / "benchmarks" / "results" / "edit_scaling.json"
    if published.is_file() and json.loads(published.read_text())["config"]["name"] == args.preset:
        args.overrides.append(f"rows_from={published}")
    report = run_module("eval_edit", ["--config", str(config), f"results_dir={ROOT / 'benchmarks' / 'results'}", *args.overrides],
                        log_table=False)
    print(eval_edit.format_table(report))


if __name__ == "__main__":
    main()
