"""Label efficiency of active preference learning: every acquisition function against `random`, both tasks.

Runs the `active_preference` pipeline (`configs/active_preference/cpu.yaml`, in process: `resources.in_process`)
for each task × acquisition function × seed, and collects the per-round metrics: win rate of the trained policy
against the initial policy (the oracle's gold reward judges, greedy and T = 0.7), mean gold reward, the reward
ensemble's accuracy on held-out pairs, ECE before and after temperature scaling, and generated tokens.

The runs of one (task, seed) share their initial policy's samples: the pool and the evaluation fixtures depend
only on the task, the seed, the prompts and the model, so the first run writes them and the others start from a
copy (`pool.json`, `fixtures.json`), exactly as if they had sampled them again.

Each run resumes where it stopped, and finished runs are read back, so a killed grid continues; the results
file is rewritten after every run (`"complete": false` until the grid is done). A run recorded in the results file
whose folder is gone (a new machine) is read back from the results file, not computed again, and recorded runs
outside `--tasks` / `--seeds` / `--acquisitions` stay in the results as they are.
`selective_generation` is copied from probe_generation.json (benchmarks/probe_generation.py) when present.
Writes benchmarks/results/active_preference.json and active_preference.png (win rate against labels).
Run: .venv/bin/python benchmarks/active_preference.py [--tasks sentiment factual] [--seeds 0 1 2]
     [--acquisitions random entropy ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

from trustray.artifacts import atomic_write_text
from trustray.config import load_config
from trustray.core.align.acquisition import get_acquisition
from trustray.pipelines.active_preference import ActivePreferenceConfig, run
from trustray.runtime import apply_offline_defaults, machine_info, save_figure, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "active_preference" / "cpu.yaml"
RUNS = ROOT / "outputs" / "benchmarks" / "active_preference"
ACQUISITIONS = ["random", "entropy", "certainty", "uncertainty", "hybrid", "ensemble", "ood"]
SHARED = ("pool.json", "fixtures.json")
logger = logging.getLogger("active_preference")


def recorded_runs() -> dict[tuple[str, str, int], tuple[list[dict], dict]]:
    """The runs the results file holds: per (task, acquisition, seed), its curve rows and calibration row."""
    path = RESULTS / "active_preference.json"
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    calibration = {(row["task"], row["acquisition"], row["seed"]): row for row in previous["calibration"]}
    runs: dict[tuple[str, str, int], tuple[list[dict], dict]] = {}
    for row in previous["curves"]:
        key = (row["task"], row["acquisition"], row["seed"])
        runs.setdefault(key, ([], calibration[key]))[0].append(row)
    return runs


def run_one(task: str, acquisition: str, seed: int, collect: bool) -> tuple[dict | None, float]:
    """One pipeline run (resumed or read back); its summary and the seconds this call spent. With `collect`, only
    a finished run is read back (None otherwise) and nothing is computed."""
    folder = RUNS / f"{task}-seed{seed}" / acquisition
    if collect:
        return (json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else None), 0.0
    config = load_config(ActivePreferenceConfig, CONFIG, [
        f"task={task}", f"acquisition={acquisition}", f"seed={seed}", f"output_dir={folder}",
        "resources.in_process=true"])
    shared_from = RUNS / f"{task}-seed{seed}" / "random"
    if acquisition != "random":
        folder.mkdir(parents=True, exist_ok=True)
        for name in SHARED:
            if not (folder / name).is_file():
                shutil.copy(shared_from / name, folder / name)
    began = time.perf_counter()
    summary = json.loads(Path(run(config)).read_text())
    return summary, time.perf_counter() - began


def run_rows(summary: dict, task: str, acquisition: str, seed: int) -> tuple[list[dict], dict]:
    """A finished run's curve rows (one per round) and its final calibration row."""
    rows = [{"task": task, "acquisition": acquisition, "labels": metrics["labels"], "seed": seed,
             "win_rate": metrics["win_rate_greedy"], "win_rate_sampled": metrics["win_rate_sampled"],
             "gold_reward": metrics["gold_reward_greedy"], "initial_gold_reward": metrics["initial_gold_reward_greedy"],
             "rm_accuracy": metrics["rm_accuracy"], "ece_before": metrics["ece_before"],
             "ece_after": metrics["ece_after"], "generated_tokens": metrics["generated_tokens"],
             "acquired_by": metrics["acquired_by"], "round_seconds": metrics["seconds"],
             "selective": metrics.get("selective")} for metrics in summary["rounds"]]
    final = summary["rounds"][-1]
    return rows, {"task": task, "acquisition": acquisition, "seed": seed, "labels": final["labels"],
                  "ece_before": final["ece_before"], "ece_after": final["ece_after"]}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def aggregate(curves: list[dict]) -> list[dict]:
    """Mean ± standard error over seeds, per (task, acquisition, labels)."""
    groups: dict[tuple, list[dict]] = {}
    for row in curves:
        groups.setdefault((row["task"], row["acquisition"], row["labels"]), []).append(row)
    table = []
    for (task, acquisition, labels), rows in sorted(groups.items()):
        entry = {"task": task, "acquisition": acquisition, "labels": labels, "seeds": len(rows)}
        for key in ("win_rate", "win_rate_sampled", "gold_reward", "rm_accuracy", "ece_before", "ece_after"):
            mean, se = mean_se([row[key] for row in rows])
            entry[key], entry[f"{key}_se"] = round(mean, 4), None if se is None else round(se, 4)
        table.append(entry)
    return table


def labels_to_match(table: list[dict], task: str) -> list[dict]:
    """Per acquisition function: the fewest labels at which its mean greedy win rate reaches random's at the
    largest budget, as a share of that budget (None: never within the grid)."""
    rows = [row for row in table if row["task"] == task]
    final = max(row["labels"] for row in rows)
    target = next(row["win_rate"] for row in rows if row["acquisition"] == "random" and row["labels"] == final)
    matches = []
    for acquisition in sorted({row["acquisition"] for row in rows}):
        reached = [row["labels"] for row in rows if row["acquisition"] == acquisition and row["win_rate"] >= target]
        matches.append({"task": task, "acquisition": acquisition, "random_final_win_rate": target,
                        "labels_fraction": round(min(reached) / final, 4) if reached else None})
    return matches


def selective_summary(curves: list[dict]) -> list[dict]:
    """Per task, at the largest budget: the mean AURC of the reward model filtering the policy's greedy answers,
    and the mean coverage and risk at each calibrated max_risk (runs that recorded it)."""
    summary = []
    for task in sorted({row["task"] for row in curves}):
        rows = [row for row in curves if row["task"] == task and row["selective"]]
        if not rows:
            continue
        final = max(row["labels"] for row in rows)
        rows = [row for row in rows if row["labels"] == final]
        entry = {"task": task, "labels": final, "runs": len(rows),
                 "aurc": round(sum(row["selective"]["aurc"] for row in rows) / len(rows), 4),
                 "acceptable_share": round(sum(row["selective"]["acceptable_share"] for row in rows) / len(rows), 4),
                 "at_risk": []}
        for index, target in enumerate(rows[0]["selective"]["at_risk"]):
            points = [row["selective"]["at_risk"][index] for row in rows]
            risks = [point["risk"] for point in points if point["risk"] is not None]
            entry["at_risk"].append({"max_risk": target["max_risk"],
                                     "coverage": round(sum(p["coverage"] for p in points) / len(points), 4),
                                     "risk": round(sum(risks) / len(risks), 4) if risks else None})
        summary.append(entry)
    return summary


def other_results() -> dict:
    """The issue's other measurements, from their own results files: held-out-topic OOD AUROC
    (reward_uncertainty.json), the acquisition-side probe (probe_generation.json) and the adapter hot swap
    (hot_swap.json), when present."""
    found = {}
    uncertainty = RESULTS / "reward_uncertainty.json"
    if uncertainty.is_file():
        found["ood"] = [{"task": task["task"], "auroc": task["ood_auroc"]["mahalanobis"], "topic": task["ood_topic"],
                         "source": "reward_uncertainty.json"} for task in json.loads(uncertainty.read_text())["tasks"]]
    probe = RESULTS / "probe_generation.json"
    if probe.is_file():
        data = json.loads(probe.read_text())
        found["selective_generation"] = [{
            "task": data["task"], "acquisition": data["acquisition"], "probe": data["probe"], "seeds": data["seeds"],
            "tokens_saved": data["summary"]["tokens_saved"]["mean"],
            "tokens_saved_ci95": data["summary"]["tokens_saved"]["ci95"],
            "win_rate_delta": data["summary"]["win_rate_delta"]["mean"],
            "win_rate_delta_ci95": data["summary"]["win_rate_delta"]["ci95"],
            "control_random_half": {key: data["summary"][f"control_{key}"]["mean"]
                                    for key in ("tokens_saved", "win_rate_delta") if f"control_{key}" in data["summary"]},
            "source": "probe_generation.json"}]
    swap = RESULTS / "hot_swap.json"
    if swap.is_file():
        data = json.loads(swap.read_text())
        found["hot_swap"] = {key: data.get(key) for key in ("seconds", "requests", "failed_requests",
                                                            "load_adapter_s", "publish_to_first_new_answer_s")}
    return found


def plot(table: list[dict], machine: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({row["task"] for row in table})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for acquisition in ACQUISITIONS:
            rows = sorted((r for r in table if r["task"] == task and r["acquisition"] == acquisition),
                          key=lambda r: r["labels"])
            if rows:
                axis.errorbar([r["labels"] for r in rows], [r["win_rate"] for r in rows],
                              yerr=[r["win_rate_se"] or 0 for r in rows],
                              marker="o", capsize=3, label=acquisition,
                              linewidth=2.5 if acquisition == "random" else 1.2)
        axis.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        axis.set(title=f"{task}: greedy win rate vs the initial policy", xlabel="labels", ylabel="win rate")
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=7)
    figure.suptitle("active preference learning (mean ± s.e. over seeds)", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, machine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sentiment", "factual"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--acquisitions", nargs="+", default=ACQUISITIONS)
    parser.add_argument("--collect", action="store_true", help="only gather the finished runs into the results")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    for name in args.acquisitions:
        get_acquisition(name)
    acquisitions = ["random"] + [name for name in args.acquisitions if name != "random"]  # random writes the pool
    machine = machine_info()
    config = load_config(ActivePreferenceConfig, CONFIG)
    curves, calibration, seconds = [], [], 0.0
    runs = [(task, seed, acquisition) for seed in args.seeds for task in args.tasks for acquisition in acquisitions]
    recorded = recorded_runs()
    previous = json.loads((RESULTS / "active_preference.json").read_text()) if recorded else {}
    previous_machine = previous.get("read_back_from_results_file", previous).get("machine")
    # Recorded runs outside this invocation's selection stay in the results as they are.
    selected = {(task, acquisition, seed) for task, seed, acquisition in runs}
    kept = {key: value for key, value in recorded.items() if key not in selected}
    for rows, final_calibration in kept.values():
        curves += rows
        calibration.append(final_calibration)
    done = read_back = len(kept)
    planned = len(runs) + len(kept)
    tasks = list(dict.fromkeys([task for task, _, _ in kept] + list(args.tasks)))
    seeds = sorted({seed for _, _, seed in selected | set(kept)})
    for task, seed, acquisition in runs:
        key = (task, acquisition, seed)
        if key in recorded and not (RUNS / f"{task}-seed{seed}" / acquisition).is_dir():
            rows, final_calibration = recorded[key]
            read_back += 1
            spent = 0.0
        else:
            summary, spent = run_one(task, acquisition, seed, args.collect)
            if summary is None:
                continue
            rows, final_calibration = run_rows(summary, task, acquisition, seed)
        done += 1
        seconds += spent
        curves += rows
        calibration.append(final_calibration)
        table = aggregate(curves)
        result = {
            "machine": machine, "complete": done == planned, "config": str(CONFIG.relative_to(ROOT)),
            "settings": config.model_dump(mode="json", include={"prompts", "samples_per_prompt", "max_tokens",
                                                                "budgets", "oracle", "reward_model", "dpo"}),
            "seeds": seeds, "runs": done, "planned_runs": planned, "seconds_this_invocation": round(seconds, 1),
            "curves": curves, "table": table, "calibration": calibration,
            "labels_to_match_random": [m for task_name in tasks if any(r["task"] == task_name for r in table)
                                       for m in labels_to_match(table, task_name)],
            "selective_generation_serving": selective_summary(curves),
            **other_results(),
        }
        if read_back:
            result["read_back_from_results_file"] = {"runs": read_back, "machine": previous_machine}
        atomic_write_text(RESULTS / "active_preference.json", json.dumps(result, indent=2) + "\n")
        logger.info("run %d of %d done (%s, %s, seed %d) in %.0f s", done, planned, task, acquisition, seed, spent)
    plot(aggregate(curves), machine, RESULTS / "active_preference.png")


if __name__ == "__main__":
    main()
