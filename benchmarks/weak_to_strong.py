"""Weak-to-strong supervision on the embedded default: performance gap recovered per task and loss.

Runs the `weak_to_strong` pipeline with `configs/weak_to_strong/cpu.yaml` (in process: `resources.in_process`,
many short trainings) into outputs/benchmarks/weak_to_strong, which resumes where it stopped (each unit of (task,
seed, weak | ceiling | student-<loss>) is kept once scored), and writes benchmarks/results/weak_to_strong.json:
the machine, the preset, every row (task, kind, loss, seed, weak, ceiling, student, pgr: accuracies in 0–1; for
`generation`, the mean gold reward of the best-of-n answer each reward model picks) and the per-(task, kind, loss)
summary (mean, standard error and 95% t-interval over seeds of each score, of the ceiling − weak gap and of PGR),
plus weak_to_strong.png.

Run: .venv/bin/python benchmarks/weak_to_strong.py [key=value ...]   (overrides of the preset)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from trustray.artifacts import atomic_write_text
from trustray.config import load_config
from trustray.pipelines.weak_to_strong import WeakToStrongConfig, run
from trustray.runtime import apply_offline_defaults, save_figure, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "weak_to_strong" / "cpu.yaml"
RUNS = ROOT / "outputs" / "benchmarks" / "weak_to_strong"


def plot(results: dict, path: Path) -> None:
    """Per task and kind: weak, ceiling and each student (mean ± s.e. over seeds), PGR written above each student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in results["summary"]:
        groups.setdefault((entry["task"], entry["kind"]), []).append(entry)
    figure, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 4.0), squeeze=False)
    for axis, ((task, kind), entries) in zip(axes[0], groups.items(), strict=True):
        names = ["weak", "ceiling", *[entry["loss"] for entry in entries]]
        scores = [entries[0]["weak"], entries[0]["ceiling"], *[entry["student"] for entry in entries]]
        axis.bar(names, [score["mean"] for score in scores], yerr=[score["se"] or 0 for score in scores], capsize=3,
                 color=["tab:grey", "tab:green", *["tab:blue"] * len(entries)])
        for index, entry in enumerate(entries, start=2):
            if entry["pgr"] is not None:
                axis.annotate(f"PGR {entry['pgr']['mean']:.2f}", (index, scores[index]["mean"]), ha="center",
                              va="bottom", fontsize=7, xytext=(0, 6), textcoords="offset points")
        low = min(score["mean"] for score in scores)
        high = max(score["mean"] for score in scores)
        axis.set_ylim(low - 0.1 * (high - low + 0.05), high + 0.25 * (high - low + 0.05))
        axis.set(title=f"{task} ({kind})", ylabel="gold reward of best-of-n" if kind == "generation" else "accuracy")
        axis.tick_params(axis="x", labelsize=8)
    figure.suptitle("weak-to-strong: students trained on weak labels (mean ± s.e. over seeds)", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, results["machine"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the cpu preset")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    config = load_config(WeakToStrongConfig, CONFIG, [f"output_dir={RUNS}", "resources.in_process=true",
                                                      *args.overrides])
    began = time.perf_counter()
    results = json.loads(run(config).read_text())
    results["seconds_this_call"] = round(time.perf_counter() - began, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "weak_to_strong.json", json.dumps(results, indent=2))
    plot(results, RESULTS / "weak_to_strong.png")


if __name__ == "__main__":
    main()
