"""Tune a baseline editor's settings on dev edits: MALMEN without meta-training, or MEMIT.

- `--editor malmen_identity`: with fresh networks MALMEN's hyper-network is the identity, and so is its input
  normaliser (it has seen no rows), so each answer token asks for the value change d = −η (k·k) g on the raw key
  and value gradient, and one ridge solve per layer combines them: a closed-form, gradient-driven editor with two
  settings (η = `lr_init`, log λ = `log_lambda_init`). Raw gradients are small, so η's scale is far above the η₀ a
  trained network starts from (1e-3 on standardised inputs). It is the baseline that shows what meta-training buys.
  Writes benchmarks/results/edit_identity_tune.json. `--editor malmen_identity_subject`: the same keyed at the
  subject's last token on layers 3-7 (edit_identity_subject_tune.json).
- `--editor memit`: MEMIT on layers 3-7 (`benchmarks/edit_causal_trace.py`) with the covariance of 512 Wikipedia
  intros' keys (as `configs/eval_edit/cpu.yaml` gives it); the grid is over its covariance weight λ (15,000 is
  MEMIT's GPT-J weight, the published setting) and its target optimisation. Writes
  benchmarks/results/edit_memit_tune.json. `--editor memit_top`: the same on layers 24-28, the top 5 of MALMEN's 6
  (edit_memit_top_tune.json).
- `--editor ft` / `ft_kl`: fine-tuning's epochs and learning rate (edit_ft_tune.json, edit_ft_kl_tune.json).

Every point edits `--edits` dev records at once and is scored as `trustray eval edit` scores (teacher-forced ES ×
strict LS, the issue's product, chooses; off-template agreement and the paper-LS drawdown are reported too).
`configs/eval_edit/cpu.yaml` takes the best point and reports it on the test split.
Run: .venv/bin/python benchmarks/edit_tune.py --editor malmen_identity [--edits 256] \
         [--grid lr_init=1e-3,0.03,0.1,0.3,1,3 log_lambda_init=0,4]
     .venv/bin/python benchmarks/edit_tune.py --editor memit [--edits 128] [--grid covariance_weight=15000,1000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from trustray.actors.editor import EditSetMaker
from trustray.artifacts import atomic_write_text
from trustray.core.editing.editset import EditSet
from trustray.core.editing.evaluation import (
    ProbeSet,
    locality_reference,
    prefix_cache,
    probe_reference,
    probe_scores,
)
from trustray.core.editing.factory import registered_editor
from trustray.data.corpus import edit_eval_texts
from trustray.data.edits import load_edit_split
from trustray.data.offtemplate import load_offtemplate_questions
from trustray.models.engines import EngineConfig
from trustray.models.hf_engine import HFEngine
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines.eval_edit import EvalEditConfig, editor_records, scored_records
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PARTIAL = Path(__file__).resolve().parents[1] / "outputs" / "edit_tune"  # the points of a run that stopped
# Per editor: the registered editor, its fixed settings, whether its networks are untrained, how many Wikipedia
# intros it is given as general text, the lowest edited layer (the layers below it run once for every point),
# the default grid and edit count, the settings that change only the final solve (for them the editor's targets are
# found once), and the results file.
MEMIT = {
    "editor": "memit", "untrained": False, "general_texts": 512, "prefix_layers": 3, "edits": 128,
    "settings": {"modules": {"layers": [3, 4, 5, 6, 7]}, "scope_threshold": None},
    "grid": {"covariance_weight": [15000.0, 3000.0, 1000.0, 300.0, 100.0, 30.0]},
    "solve_only": ["covariance_weight"],
    "result": RESULTS / "edit_memit_tune.json",
}
EDITORS = {
    "malmen_identity": {
        "editor": "malmen", "untrained": True, "general_texts": 0, "prefix_layers": 24, "edits": 256,
        # MALMEN's layers and lengths of configs/edit_train/cpu.yaml; the end-of-turn position gives no key.
        "settings": {"modules": {"layers": [-6, -5, -4, -3, -2, -1], "module": "mlp.down_proj"}, "max_length": 96,
                     "batch_size": 16, "rank": 1024, "prefix_layers": 24},
        "grid": {"lr_init": [1e-3, 0.03, 0.1, 0.3, 1.0, 3.0], "log_lambda_init": [0.0, 4.0]},
        "result": RESULTS / "edit_identity_tune.json",
    },
    # The same at the subject's last token on MEMIT's layers 3-7 (configs/edit_train/cpu_subject.yaml's keys):
    # what one value gradient there writes before any meta-training.
    "malmen_identity_subject": {
        "editor": "malmen", "untrained": True, "general_texts": 0, "prefix_layers": 3, "edits": 128,
        "settings": {"modules": {"layers": [3, 4, 5, 6, 7], "module": "mlp.down_proj"}, "key_position": "subject",
                     "max_length": 96, "batch_size": 16, "rank": 1024, "prefix_layers": 3},
        "grid": {"lr_init": [1.0, 3.0, 10.0, 30.0, 100.0], "log_lambda_init": [0.0]},
        "result": RESULTS / "edit_identity_subject_tune.json",
    },
    "memit": MEMIT,
    # Fine-tuning the top 6 layers' MLP output projections (configs/eval_edit/cpu.yaml's `ft`): epochs and step
    # size (ROME's FT-L: 25 epochs at 5e-4). `ft_kl` adds its locality KL and the replay of 64 intros.
    "ft": {
        "editor": "ft", "untrained": False, "general_texts": 0, "prefix_layers": 24, "edits": 128,
        "settings": {"modules": {"layers": [-6, -5, -4, -3, -2, -1]}, "max_length": 96, "prefix_layers": 24},
        "grid": {"steps": [5, 25], "lr": [5e-4, 2e-3]},
        "result": RESULTS / "edit_ft_tune.json",
    },
    # ft_kl's epochs stop at 10: each costs about twice ft's (the KL's reference pass and the replay), so 25 would
    # take about 5 h for the 1,024-edit row on the 2-core machine.
    "ft_kl": {
        "editor": "ft_kl", "untrained": False, "general_texts": 64, "prefix_layers": 24, "edits": 128,
        "settings": {"modules": {"layers": [-6, -5, -4, -3, -2, -1]}, "max_length": 96, "prefix_layers": 24},
        "grid": {"steps": [5, 10], "lr": [5e-4, 2e-3]},
        "result": RESULTS / "edit_ft_kl_tune.json",
    },
    # The same closed form on the top 5 of MALMEN's 6 layers (the 6th would hold the targets, and MEMIT needs a
    # layer above the edited ones). At the default target step 0.1 no target there reached its answer.
    "memit_top": {
        **MEMIT, "prefix_layers": 24,
        "settings": {"modules": {"layers": [24, 25, 26, 27, 28]}, "scope_threshold": None},
        "grid": {"target_lr": [0.5, 2.0], "covariance_weight": [3000.0, 1000.0, 300.0, 100.0]},
        "result": RESULTS / "edit_memit_top_tune.json",
    },
}


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    """`name=v1,v2` items -> {name: [v1, v2]} (numbers)."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid items are name=v1,v2,...; got {item!r}")
        grid[name] = [float(value) if "." in value or "e" in value else int(value) for value in values.split(",")]
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editor", choices=sorted(EDITORS), required=True)
    parser.add_argument("--edits", type=int, help="dev records edited at once (default: the editor's)")
    parser.add_argument("--grid", nargs="+", default=[], help="name=v1,v2 ... (default: the editor's grid)")
    parser.add_argument("--offtemplate", type=int, default=100, help="FanOutQA and cloze questions, each")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    spec = EDITORS[args.editor]
    grid = parse_grid(args.grid) if args.grid else spec["grid"]
    unknown = set(grid) - set(registered_editor(spec["editor"]).Settings.model_fields)
    if unknown:
        raise SystemExit(f"{args.editor} has no setting {sorted(unknown)}")
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(args.threads)
    engine = HFEngine(EngineConfig(model=DEFAULT_CHAT_MODEL, dtype="float32"), device="cpu")
    model, tokenizer = engine.model, engine.tokenizer
    records = load_edit_split("dev")[: args.edits or spec["edits"]]
    # Scored as eval_edit scores (its default paraphrases and probes per record; the editor sees only the others),
    # the unedited layers below the edited ones run once for every scored pair.
    scoring = EvalEditConfig(editors=[{"editor": spec["editor"]}], eval_sample=len(records))
    scored, given = scored_records(scoring, records), editor_records(scoring, records)
    probes = ProbeSet.from_rows(load_offtemplate_questions(args.offtemplate, args.offtemplate))
    prefix = prefix_cache(model, tokenizer, scored, spec["prefix_layers"], probes=probes)
    probe_ref = probe_reference(model, tokenizer, probes, prefix=prefix)
    reference = locality_reference(model, tokenizer, scored, prefix=prefix)
    general_text = edit_eval_texts(scoring.general.ppl_texts, spec["general_texts"])[1] or None
    solve_only = [name for name in grid if name in spec.get("solve_only", ())]
    outer = [name for name in grid if name not in solve_only]
    # Points of a grid run that stopped (one point of fine-tuning can take most of an hour) are kept here and
    # reused when the run is repeated with the same records, settings and scoring.
    context = {"model": DEFAULT_CHAT_MODEL, "editor": args.editor, "edits": len(records), "settings": spec["settings"],
               "general_texts": spec["general_texts"], "offtemplate": args.offtemplate}
    partial = PARTIAL / f"{args.editor}.json"
    done = json.loads(partial.read_text()) if partial.is_file() else {}
    kept = done.get("points", []) if done.get("context") == context else []
    if kept:
        print(f"reusing {len(kept)} points of the stopped run in {partial}", flush=True)
    points = []
    for outer_values in itertools.product(*(grid[name] for name in outer)):
        settings = {**spec["settings"], **dict(zip(outer, outer_values, strict=True))}
        combos = [{**dict(zip(outer, outer_values, strict=True)), **dict(zip(solve_only, inner, strict=True))}
                  for inner in itertools.product(*(grid[name] for name in solve_only))]
        found = [next((p for p in kept if all(p.get(k) == v for k, v in combo.items())), None) for combo in combos]
        if all(found):
            points.extend(found)
            continue
        maker = EditSetMaker(model, tokenizer, model_fingerprint(DEFAULT_CHAT_MODEL), spec["editor"],
                             editor_settings=settings, general_text=general_text, untrained=spec["untrained"])
        began = time.perf_counter()
        # MEMIT's targets do not depend on its covariance weight: found once, spread once per weight.
        plan = maker.editor.target_plan(given) if solve_only else None
        plan_seconds = time.perf_counter() - began
        for inner_values in itertools.product(*(grid[name] for name in solve_only)):
            chosen = {**dict(zip(outer, outer_values, strict=True)), **dict(zip(solve_only, inner_values, strict=True))}
            began = time.perf_counter()
            if plan is None:
                edit_set, _ = maker.compute_deltas(given)
            else:
                maker.editor.settings = maker.editor.settings.model_copy(update=chosen)
                edit_set = EditSet(maker.editor.spread(plan), scope=maker.editor.edit_scope())
            seconds = time.perf_counter() - began + plan_seconds
            with maker.applied(edit_set):
                scores = maker.scores(scored, reference, prefix=prefix)
                offtemplate = probe_scores(model, tokenizer, probes, probe_ref, prefix=prefix)
            point = {**chosen, **{k: scores[k] for k in ("es", "es_exact", "gs", "ls")},
                     "es_times_ls": scores["es"] * scores["ls"], "offtemplate_agreement": offtemplate["agreement"],
                     "ls_gold_drawdown": offtemplate["drawdown"], "edit_seconds": round(seconds, 1)}
            points.append(point)
            atomic_write_text(partial, json.dumps({"context": context, "points": points + [p for p in kept if p not in points]}, indent=2) + "\n")
            print("  ".join(f"{k} {v:.4g}" for k, v in point.items()), flush=True)
    best = max(points, key=lambda point: point["es_times_ls"])
    report = {"model": DEFAULT_CHAT_MODEL, "editor": args.editor, "split": "dev", "edits": len(records),
              "settings": spec["settings"], "general_texts": spec["general_texts"], "objective": "es_times_ls",
              "best": {name: best[name] for name in grid}, "grid": points, "machine": machine_info()}
    atomic_write_text(spec["result"], json.dumps(report, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(f"best: {report['best']}; written: {spec['result']}")


if __name__ == "__main__":
    main()
