"""MALMEN without meta-training: tune the identity hyper-network's step η and ridge λ on dev edits.

With fresh networks MALMEN's hyper-network is the identity, and so is its input normaliser (it has seen no
rows), so each answer token asks for the value change d = −η (k·k) g on the raw key and value gradient, and one
ridge solve per layer combines them: a closed-form, gradient-driven editor with two settings. Raw gradients are
small, so η's scale is far above the η₀ a trained network starts from (1e-3 on standardised inputs): at 1e-3
the edits barely move the answers (the grid's first rows). Tuned here on `--edits` dev records edited at once (teacher-forced ES × strict LS, the issue's product;
off-template agreement reported too), it is the baseline that shows what meta-training buys: `malmen_identity` in
configs/eval_edit/cpu.yaml takes the best pair, and is reported on the test split there. Writes
benchmarks/results/edit_identity_tune.json with every grid point and the machine.
Run: .venv/bin/python benchmarks/edit_identity_tune.py [--edits 256] [--lr 1e-3 0.03 0.1 0.3 1 3] [--log-lambda 0 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trustray.actors.editor import EditSetMaker
from trustray.artifacts import atomic_write_text
from trustray.core.editing.evaluation import (
    ProbeSet,
    locality_reference,
    prefix_cache,
    probe_reference,
    probe_scores,
)
from trustray.data.edits import load_edit_split
from trustray.data.offtemplate import load_offtemplate_questions
from trustray.models.engines import EngineConfig
from trustray.models.hf_engine import HFEngine
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines.eval_edit import EvalEditConfig, editor_records, scored_records
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "edit_identity_tune.json"
# MALMEN's layers and lengths of configs/edit_train/cpu.yaml; the end-of-turn position gives no key (the default).
BASE_SETTINGS = {"modules": {"layers": [-6, -5, -4, -3, -2, -1], "module": "mlp.down_proj"}, "max_length": 96,
                 "batch_size": 16, "rank": 1024, "prefix_layers": 24}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=256)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 0.03, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--log-lambda", type=float, nargs="+", default=[0.0, 4.0])
    parser.add_argument("--offtemplate", type=int, default=100, help="FanOutQA and cloze questions, each")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(args.threads)
    engine = HFEngine(EngineConfig(model=DEFAULT_CHAT_MODEL, dtype="float32"), device="cpu")
    model, tokenizer = engine.model, engine.tokenizer
    records = load_edit_split("dev")[: args.edits]
    # Scored as eval_edit scores (its default paraphrases and probes per record; the editor sees only the others),
    # the unedited layers below MALMEN's run once for every scored pair.
    scoring = EvalEditConfig(editors=[{"editor": "malmen"}], eval_sample=len(records))
    scored, given = scored_records(scoring, records), editor_records(scoring, records)
    probes = ProbeSet.from_rows(load_offtemplate_questions(args.offtemplate, args.offtemplate))
    prefix = prefix_cache(model, tokenizer, scored, BASE_SETTINGS["prefix_layers"], probes=probes)
    probe_ref = probe_reference(model, tokenizer, probes, prefix=prefix)
    reference = locality_reference(model, tokenizer, scored, prefix=prefix)
    grid = []
    for lr in args.lr:
        for log_lambda in args.log_lambda:
            settings = {**BASE_SETTINGS, "lr_init": lr, "log_lambda_init": log_lambda}
            maker = EditSetMaker(model, tokenizer, model_fingerprint(DEFAULT_CHAT_MODEL), "malmen",
                                 editor_settings=settings, untrained=True)
            began = time.perf_counter()
            edit_set, _ = maker.compute_deltas(given)
            with maker.applied(edit_set):
                scores = maker.scores(scored, reference, prefix=prefix)
                offtemplate = probe_scores(model, tokenizer, probes, probe_ref, prefix=prefix)
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
