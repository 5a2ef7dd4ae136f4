"""Meta-training at the evaluated scale, step by step: the histories of MALMEN's long runs on the 2-core machine.

Every `edit_train` step edits `edits_per_step` training records at once and records teacher-forced ES / GS / LS
of those very edits (LS on their locality probes) before the meta-gradient; every `eval_every` steps it also edits
dev records and scores them the same way (`dev_*`). The runs are the measurement and go on over several sessions;
this collects their histories from each run's newest checkpoint into benchmarks/results/edit_train_progress.json:
per run the preset, the settings that tell the runs apart, the newest step, and every `--every` steps the mean of
the `--window` steps ending there (one step's batch moves ES by several points), with the dev scores as recorded.
Step times are medians; other jobs often shared the cores, so they are upper bounds. A run whose checkpoints are
not on this machine (outputs/ stays on the machine that trained it) keeps its entry from the published file, with
the machine it was collected on.
Run: .venv/bin/python benchmarks/edit_train_progress.py [--runs cpu_scale cpu_subject cpu_scale_text] [--every 5]
[--window 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from trustray.artifacts import atomic_write_text
from trustray.pipelines.training import latest_checkpoint, read_step
from trustray.runtime import machine_info

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("es", "gs", "ls", "loss", "log_eta", "log_lambda")
DEV_METRICS = ("dev_es", "dev_es_exact", "dev_gs", "dev_ls", "dev_ls_known")
DISTINGUISHING = ("modules", "key_position", "prefix_layers", "preserve_weight", "preserve_units", "lr_init",
                  "retention_coef")


def summarise(history: list[dict], every: int, window: int) -> list[dict]:
    """Every `every`-th step (and the newest): the window's mean of each in-step metric, plus the dev scores of
    the newest step in the window that has them."""
    marks = sorted({step["step"] for step in history if step["step"] % every == 0} | {history[-1]["step"]})
    points = []
    for mark in marks:
        steps = [step for step in history if mark - window < step["step"] <= mark]
        point = {"step": mark, "window": len(steps), **{key: statistics.fmean(step[key] for step in steps)
                                                        for key in METRICS}}
        with_dev = [step for step in steps if "dev_es" in step]
        if with_dev:
            point.update({key: with_dev[-1][key] for key in DEV_METRICS} | {"dev_step": with_dev[-1]["step"]})
        points.append(point)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["cpu_scale", "cpu_subject", "cpu_scale_text"])
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "edit_train_progress.json")
    args = parser.parse_args()
    before = json.loads(args.output.read_text()) if args.output.is_file() else {"runs": {}}
    machine = machine_info()
    runs = {}
    for name in args.runs:
        folder = ROOT / "outputs" / "edit_train" / name / "checkpoints"
        newest = latest_checkpoint(folder)
        if newest is None:
            if name in before["runs"]:
                print(f"{name}: no checkpoint here; its entry is kept from {args.output}")
                runs[name] = {"machine": before.get("machine"), **before["runs"][name]}
                continue
            raise FileNotFoundError(f"no finished checkpoint under {folder}: run `trustray run edit_train --config "
                                    f"configs/edit_train/{name}.yaml` first")
        history = read_step(newest)["history"]
        settings = json.loads((folder / "metadata.json").read_text())["settings"]
        editor_settings = settings["editor_settings"]
        runs[name] = {
            "preset": f"configs/edit_train/{name}.yaml", "steps": history[-1]["step"],
            "edits_per_step": settings["edits_per_step"],
            "settings": {key: editor_settings.get(key) for key in DISTINGUISHING},
            "step_seconds_median": statistics.median(step["step_seconds"] for step in history),
            "points": summarise(history, args.every, args.window), "machine": machine,
        }
    report = {"machine": machine, "every": args.every, "window": args.window, "runs": runs}
    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    for name, run in runs.items():
        for point in run["points"]:
            print(f"{name:<12} step {point['step']:>4}  ES {point['es']:.3f}  GS {point['gs']:.3f}  LS {point['ls']:.3f}"
                  + (f"  dev ES {point['dev_es']:.3f} LS {point['dev_ls']:.3f}" if "dev_es" in point else ""))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
