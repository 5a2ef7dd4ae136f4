"""Is the scored locality (LS) harder than "unrelated prompts"? LS after N edits on three kinds of prompt.

`trustray eval edit` scores LS on each edited record's first `locality_scored` probes: same-relation neighbours
("What is the occupation of Brian Eno?" next to an edit of Lope de Vega's occupation), as in CounterFact. Editing
papers often measure locality on unrelated questions instead (zsRE's NQ questions). For the editors of an
`eval_edit` config, this script applies N edits exactly as `eval_edit` does (same records, same hidden probes) and
measures LS, the agreement with the unedited model's teacher-forced answer, on:

- `neighbours`: the scored probes of the edited records (the same number as `eval_edit`'s LS);
- `other_relation`: the edited records' remaining probes, about another entity and another relation (`ft_kl`
  anchors on these: its number there is not held out);
- `held_out_facts`: the questions of `--held-out` records of the dev split with their true answers, facts about
  entities no edit names (no editor sees them).

Rows (`<editor>-<N>`) are written to benchmarks/results/edit_locality_kinds.json as each one finishes; a rerun
skips the rows already there for the same config.
Run: .venv/bin/python benchmarks/edit_locality_kinds.py [--config configs/eval_edit/cpu.yaml]
     [--editors malmen,malmen_rounds,malmen_text,ft_kl] [--n-edits 128,1024] [--held-out 512]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from trustray.artifacts import atomic_write_text
from trustray.core.editing.base import build_editor, editor_class
from trustray.core.editing.editset import EditSet
from trustray.core.editing.evaluation import locality_reference, prefix_cache, teacher_forced_scores
from trustray.data.corpus import edit_eval_texts
from trustray.models.engines import EngineConfig, HFEngine
from trustray.models.sources import model_fingerprint
from trustray.pipelines.edit_train import load_records
from trustray.pipelines.eval_edit import EvalEditConfig, edited_layers, editor_records, load_all_records
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "edit_locality_kinds.json"
logger = logging.getLogger("edit_locality_kinds")


def probe_sets(config: EvalEditConfig, edited: list[dict], held_out: list[dict]) -> dict[str, list[dict]]:
    """Records carrying only the locality pairs of each kind (no paraphrases: GS is not measured here)."""
    scored, kept = edited[: config.eval_sample], config.locality_scored
    return {
        "neighbours": [{**r, "paraphrases": [], "locality": r["locality"][:kept]} for r in scored],
        "other_relation": [{**r, "paraphrases": [], "locality": r["locality"][kept:]} for r in scored],
        "held_out_facts": [
            {**r, "paraphrases": [], "locality": [{"prompt": r["prompt"], "answer": r["target_true"]}]}
            for r in held_out
        ],
    }


def edited_row(
    config: EvalEditConfig,
    run,
    model,
    tokenizer,
    records: list[dict],
    sets: dict[str, list[dict]],
    caches: dict,
    references: dict,
    replay: list[str],
) -> dict:
    """Edit `records` at once with `run`'s editor, as `eval_edit` does, and score LS on every kind of probe."""
    settings = dict(run.editor_settings)
    if "general_text" in editor_class(run.editor).Settings.model_fields and not settings.get("general_text"):
        settings["general_text"] = replay
    editor = build_editor(
        run.editor, model, tokenizer, model_fingerprint(config.model), run.editor_dir, settings
    )
    began = time.perf_counter()
    deltas = editor.compute_deltas(editor_records(config, records))
    row: dict = {
        "editor": run.name,
        "n_edits": len(records),
        "seconds": round(time.perf_counter() - began, 1),
    }
    cached = min(edited_layers(deltas)) >= config.scoring_prefix_layers
    with EditSet(deltas).apply(model):
        for kind, probes in sets.items():
            scores = teacher_forced_scores(
                model,
                tokenizer,
                probes,
                references[kind],
                config.batch_size,
                prefix=caches[kind] if cached else None,
            )
            row[kind] = {
                "ls": round(scores["ls"], 4),
                "ls_gold": round(scores["ls_gold"], 4),
                "pairs": len(references[kind]),
            }
            if kind == "neighbours":
                row["es"] = round(scores["es"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/eval_edit/cpu.yaml")
    parser.add_argument(
        "--editors",
        default="malmen,malmen_rounds,malmen_text,ft_kl",
        help="labels of the config's editors, in the order run",
    )
    parser.add_argument(
        "--n-edits", default="128,1024", help="comma-separated numbers of edits applied at once"
    )
    parser.add_argument("--held-out", type=int, default=512, help="dev records whose questions are scored")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(args.threads)
    config = EvalEditConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    runs = {run.name: run for run in config.editors}
    unknown = [name for name in args.editors.split(",") if name not in runs]
    if unknown:
        raise SystemExit(f"{args.config} has no editor {unknown}; it has {sorted(runs)}")
    if config.locality_scored is None:
        raise SystemExit("the config scores every locality probe: no `other_relation` probes are left")

    identity = {"config": config.model_dump(mode="json"), "held_out": args.held_out}
    report = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    if report.get("identity") != identity:
        report = {"identity": identity, "rows": {}}
    todo = [
        (name, n)
        for n in map(int, args.n_edits.split(","))
        for name in args.editors.split(",")
        if f"{name}-{n}" not in report["rows"]
    ]
    if not todo:
        logger.info("every row is already in %s", RESULT)
        return

    engine = HFEngine(EngineConfig(model=config.model, dtype="float32"), device="cpu")
    model, tokenizer = engine.model, engine.tokenizer
    all_records, held_out = load_all_records(config), load_records(config.data, "dev")[: args.held_out]
    _, replay = edit_eval_texts(config.general.ppl_texts, config.replay_texts)
    for n in sorted({n for _, n in todo}):
        records = all_records[:n]
        sets = probe_sets(config, records, held_out)
        began = time.perf_counter()
        caches = {
            kind: prefix_cache(model, tokenizer, probes, config.scoring_prefix_layers, config.batch_size)
            for kind, probes in sets.items()
        }
        references = {
            kind: locality_reference(model, tokenizer, probes, config.batch_size, prefix=caches[kind])
            for kind, probes in sets.items()
        }
        logger.info(
            "N=%d: unedited predictions of %s pairs in %.0f s",
            n,
            {k: len(v) for k, v in references.items()},
            time.perf_counter() - began,
        )
        for name in [name for name, m in todo if m == n]:
            report["rows"][f"{name}-{n}"] = edited_row(
                config, runs[name], model, tokenizer, records, sets, caches, references, replay
            )
            report["machine"] = machine_info()
            atomic_write_text(RESULT, json.dumps(report, indent=2) + "\n")
            logger.info("%s at N=%d: %s", name, n, json.dumps(report["rows"][f"{name}-{n}"]))
    for name, row in report["rows"].items():
        print(
            f"{name:<22} ES {row['es']:.3f}  LS neighbours {row['neighbours']['ls']:.3f}  other relation "
            f"{row['other_relation']['ls']:.3f}  held-out facts {row['held_out_facts']['ls']:.3f}"
        )
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
