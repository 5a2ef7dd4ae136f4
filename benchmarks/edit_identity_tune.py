"""MALMEN without meta-training: tune the identity hyper-network's step η and ridge λ on dev edits.

With fresh networks MALMEN's hyper-network is the identity, so each answer token asks for the value change
d = −η (k·k) g and one ridge solve per layer combines them: a closed-form, gradient-driven editor with two
settings. Tuned here on `--edits` dev records edited at once (teacher-forced ES × strict LS, the issue's product;
off-template agreement reported too), it is the baseline that shows what meta-training buys: `malmen_identity` in
configs/eval_edit/cpu.yaml takes the best pair, and is reported on the test split there. Writes
benchmarks/results/edit_identity_tune.json with every grid point and the machine.
Run: .venv/bin/python benchmarks/edit_identity_tune.py [--edits 256] [--lr 3e-4 1e-3 3e-3 1e-2] [--log-lambda 0 3 6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trustray.actors.editor import EditSetMaker
from trustray.artifacts import atomic_write_text
from trustray.core.editing.evaluation import ProbeSet, probe_reference, probe_scores
from trustray.data.edits import load_edit_split
from trustray.data.offtemplate import load_offtemplate_questions
from trustray.models.engines import EngineConfig
from trustray.models.hf_engine import HFEngine
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "edit_identity_tune.json"
# MALMEN's layers and lengths of configs/edit_train/cpu.yaml; the end-of-turn position gives no key (the default).
BASE_SETTINGS = {"modules": {"layers": [-6, -5, -4, -3, -2, -1], "module": "mlp.down_proj"}, "max_length": 96,
                 "batch_size": 16, "rank": 1024, "prefix_layers": 24}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=256)
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--log-lambda", type=float, nargs="+", default=[0.0, 3.0, 6.0])
    parser.add_argument("--offtemplate", type=int, default=100, help="FanOutQA and cloze questions, each")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(args.threads)
    engine = HFEngine(EngineConfig(model=DEFAULT_CHAT_MODEL, dtype="float32"), device="cpu")
    model, tokenizer = engine.model, engine.tokenizer
    records = load_edit_split("dev")[: args.edits]
    probes = ProbeSet.from_rows(load_offtemplate_questions(args.offtemplate, args.offtemplate))
    probe_ref = probe_reference(model, tokenizer, probes)
    grid, reference = [], None
    for lr in args.lr:
        for log_lambda in args.log_lambda:
            settings = {**BASE_SETTINGS, "lr_init": lr, "log_lambda_init": log_lambda}
            maker = EditSetMaker(model, tokenizer, model_fingerprint(DEFAULT_CHAT_MODEL), "malmen",
                                 editor_settings=settings, untrained=True)
            if reference is None:
                reference = maker.locality_reference(records)
            began = time.perf_counter()
            edit_set, _ = maker.compute_deltas(records)
            with maker.applied(edit_set):
                scores = maker.scores(records, reference)
                offtemplate = probe_scores(model, tokenizer, probes, probe_ref)
            point = {"lr_init": lr, "log_lambda_init": log_lambda, **{k: scores[k] for k in ("es", "es_exact", "gs", "ls")},
                     "es_times_ls": scores["es"] * scores["ls"], "offtemplate_agreement": offtemplate["agreement"],
                     "ls_gold_drawdown": offtemplate["drawdown"], "seconds": round(time.perf_counter() - began, 1)}
            grid.append(point)
            print(f"η {lr:.0e}  log λ {log_lambda:4.1f}  ES {point['es']:.3f}  LS {point['ls']:.3f}  ES×LS "
                  f"{point['es_times_ls']:.3f}  off-template agreement {point['offtemplate_agreement']:.3f}", flush=True)
    best = max(grid, key=lambda point: point["es_times_ls"])
    report = {"model": DEFAULT_CHAT_MODEL, "split": "dev", "edits": len(records), "settings": BASE_SETTINGS,
              "objective": "es_times_ls", "best": {"lr_init": best["lr_init"], "log_lambda_init": best["log_lambda_init"]},
              "grid": grid, "machine": machine_info()}
    atomic_write_text(RESULT, json.dumps(report, indent=2) + "\n")
    print(f"best: η {best['lr_init']:.0e}, log λ {best['log_lambda_init']}; written: {RESULT}")


if __name__ == "__main__":
    main()
