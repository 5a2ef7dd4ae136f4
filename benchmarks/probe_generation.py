"""Selective generation on the acquisition side: how many generated tokens a probe saves, at equal labels.

For each seed, runs the `active_preference` pipeline (`configs/active_preference/cpu.yaml`, in process) twice in
this process, with the same task, acquisition function and label budgets:
- baseline: every pool prompt gets `samples_per_prompt` full responses;
- probe: every pool prompt first gets `probe.samples` prefixes of `probe.tokens` tokens, and only the `probe.keep`
  share with the highest predictive entropy gets full responses;
- random_half (the control): a random `probe.keep` share of the prompts gets full responses, no prefixes. It
  tells the probe's choice of prompts apart from merely having fewer candidate pairs to acquire from.

Reports per seed and over seeds (mean, s.e., 95% t-interval): generated tokens of each (pool and probe prefixes,
counted by the pipeline), `tokens_saved` = 1 − probe / baseline, and the greedy win rate against the initial policy
at the largest budget, with `win_rate_delta` = probe − baseline (the issue's target: ≥ 30% saved, delta within 2
points) and `control_win_rate_delta` = random_half − baseline. Runs resume and finished runs are read back
(outputs/benchmarks/probe_generation); an arm whose folder is gone is read back from the results file when that
file holds it for the same settings (`read_back_from_results_file` says how many, and from which machine).
Writes benchmarks/results/probe_generation.json; `benchmarks/active_preference.py` copies its summary into
active_preference.json's `selective_generation`.

Run: .venv/bin/python benchmarks/probe_generation.py [--task sentiment] [--acquisition random] [--seeds 0 1 2]
     [--samples 4] [--tokens 6] [--keep 0.5]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from trustray.artifacts import atomic_write_text
from trustray.config import load_config
from trustray.core.w2s.protocol import interval
from trustray.pipelines.active_preference import ActivePreferenceConfig, run
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "active_preference" / "cpu.yaml"
RUNS = ROOT / "outputs" / "benchmarks" / "probe_generation"
logger = logging.getLogger("probe_generation")


ARMS = ("baseline", "probe", "random_half")


def arm_folder(args: argparse.Namespace, seed: int, arm: str) -> Path:
    name = {"baseline": "baseline", "probe": f"probe-s{args.samples}-t{args.tokens}-k{args.keep}",
            "random_half": f"random-k{args.keep}"}[arm]
    return RUNS / f"{args.task}-{args.acquisition}-seed{seed}" / name


def run_one(args: argparse.Namespace, seed: int, arm: str) -> tuple[dict, float]:
    """One pipeline run's final round (resumed, or read back when finished) and the seconds this call spent."""
    folder = arm_folder(args, seed, arm)
    overrides = [f"task={args.task}", f"acquisition={args.acquisition}", f"seed={seed}", f"output_dir={folder}",
                 "resources.in_process=true"]
    if arm == "probe":
        overrides += [f"probe.samples={args.samples}", f"probe.tokens={args.tokens}", f"probe.keep={args.keep}"]
    if arm == "random_half":
        overrides += [f"probe.keep={args.keep}", "probe.rank_by=random"]
    began = time.perf_counter()
    summary = json.loads(Path(run(load_config(ActivePreferenceConfig, CONFIG, overrides))).read_text())
    return final_round(summary), time.perf_counter() - began


def recorded_arms(args: argparse.Namespace) -> tuple[dict[tuple[int, str], dict], dict | None]:
    """{(seed, arm): (final round, seconds)} from the results file where it was made with these settings, and the
    machine it was made on."""
    path = RESULTS / "probe_generation.json"
    if not path.is_file():
        return {}, None
    previous = json.loads(path.read_text())
    same = (previous["task"], previous["acquisition"], previous["probe"]) == (
        args.task, args.acquisition, {"samples": args.samples, "tokens": args.tokens, "keep": args.keep})
    if not same:
        return {}, None
    arms = {(row["seed"], arm): (row[arm], row["seconds"][arm]) for row in previous["rows"] for arm in ARMS
            if arm in row}
    return arms, previous.get("read_back_from_results_file", previous)["machine"]


def final_round(summary: dict) -> dict:
    rounds = summary["rounds"]
    return {"labels": rounds[-1]["labels"], "win_rate": rounds[-1]["win_rate_greedy"],
            "win_rate_sampled": rounds[-1]["win_rate_sampled"], "gold_reward": rounds[-1]["gold_reward_greedy"],
            "generated_tokens": rounds[-1]["generated_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sentiment", choices=["sentiment", "factual"])
    parser.add_argument("--acquisition", default="random")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=4, help="probe prefixes per prompt")
    # The probe's cost is known before it runs: samples × tokens per prompt against samples_per_prompt full
    # responses (up to max_tokens = 24 each) for the prompts it drops. At keep 0.5, 4 × 4 tokens leaves about
    # a third of the pool's tokens saved; 4 × 6 (ProbeSettings' default) leaves about a quarter.
    parser.add_argument("--tokens", type=int, default=4, help="tokens per probe prefix")
    parser.add_argument("--keep", type=float, default=0.5, help="share of pool prompts given full responses")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    recorded, recorded_machine = recorded_arms(args)
    rows, read_back = [], 0
    for seed in args.seeds:
        finals, seconds = {}, {}
        for arm in ARMS:
            if (seed, arm) in recorded and not (arm_folder(args, seed, arm) / "summary.json").is_file():
                (finals[arm], seconds[arm]), read_back = recorded[(seed, arm)], read_back + 1
                logger.info("seed %d %s: read back from the results file", seed, arm)
                continue
            finals[arm], spent = run_one(args, seed, arm)
            seconds[arm] = round(spent, 1)
        base, with_probe, control = finals["baseline"], finals["probe"], finals["random_half"]
        rows.append({"seed": seed, "labels": base["labels"], **finals,
                     "tokens_saved": round(1 - with_probe["generated_tokens"] / base["generated_tokens"], 4),
                     "win_rate_delta": round(with_probe["win_rate"] - base["win_rate"], 4),
                     "control_tokens_saved": round(1 - control["generated_tokens"] / base["generated_tokens"], 4),
                     "control_win_rate_delta": round(control["win_rate"] - base["win_rate"], 4),
                     "probe_minus_control_win_rate": round(with_probe["win_rate"] - control["win_rate"], 4),
                     "seconds": seconds})
        logger.info("seed %d: tokens %d → %d (control %d), win rate %.3f → %.3f (control %.3f)", seed,
                    base["generated_tokens"], with_probe["generated_tokens"], control["generated_tokens"],
                    base["win_rate"], with_probe["win_rate"], control["win_rate"])
    summary = {key: interval([row[key] for row in rows]).as_dict() for key in (
        "tokens_saved", "win_rate_delta", "control_tokens_saved", "control_win_rate_delta",
        "probe_minus_control_win_rate")}
    for arm in ARMS:
        summary[f"{arm}_win_rate"] = interval([row[arm]["win_rate"] for row in rows]).as_dict()
        summary[f"{arm}_generated_tokens"] = interval([row[arm]["generated_tokens"] for row in rows]).as_dict()
    result = {
        "machine": machine_info(), "config": str(CONFIG.relative_to(ROOT)), "task": args.task,
        "acquisition": args.acquisition, "probe": {"samples": args.samples, "tokens": args.tokens, "keep": args.keep},
        "seeds": args.seeds, "rows": rows, "summary": summary,
        "targets": {"tokens_saved_at_least": 0.3, "win_rate_delta_within": 0.02},
    }
    if read_back:
        result["read_back_from_results_file"] = {"runs": read_back, "machine": recorded_machine}
    atomic_write_text(RESULTS / "probe_generation.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
