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
  entities no edit names (no editor sees them);
- `held_out_known` (by generation, not LS): of the held-out facts whose true answer is in the unedited model's
  greedy reply (16 tokens), the share still answered after the edit: what the model knew that it still knows.
  LS counts every answer token, also where the unedited model was wrong; this chat model rarely starts its reply
  with the answer itself ("Great Pyramid of Giza belongs to ..."), so the first answer token LS compares is
  mostly a matter of reply format, which an edit of hundreds of short answers changes.

Each N also gets an `unedited` row: LS is 1 there by definition, and its `ls_gold` (accuracy against the gold
answers) is what an edit would ideally keep.

Rows (`<editor>-<N>`) are written to benchmarks/results/edit_locality_kinds.json as each one finishes; a rerun
skips the rows already there for the same config.
Run: .venv/bin/python benchmarks/edit_locality_kinds.py [--config configs/eval_edit/cpu.yaml]
     [--editors malmen,malmen_preserve,malmen_text,malmen_rounds,ft_kl] [--n-edits 1,16,128,1024] [--held-out 884]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import yaml

from trustray.actors.editor import EditSetMaker
from trustray.artifacts import atomic_write_text
from trustray.core.editing.evaluation import locality_reference, prefix_cache, teacher_forced_scores
from trustray.data.corpus import edit_eval_texts
from trustray.models.engines import EngineConfig, SamplingParams
from trustray.models.hf_engine import HFEngine
from trustray.models.sources import model_fingerprint
from trustray.pipelines.edit_train import load_records
from trustray.pipelines.eval_edit import (
    EvalEditConfig,
    edited_layers,
    editor_records,
    load_all_records,
)
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "edit_locality_kinds.json"
KINDS = ("neighbours", "other_relation", "held_out_facts", "held_out_known")
logger = logging.getLogger("edit_locality_kinds")


def edited_probe_sets(config: EvalEditConfig, edited: list[dict]) -> dict[str, list[dict]]:
    """The edited records' scored and remaining locality probes (no paraphrases: GS is not measured here)."""
    scored, kept = edited[: config.eval_sample], config.locality_scored
    return {
        "neighbours": [{**r, "paraphrases": [], "locality": r["locality"][:kept]} for r in scored],
        "other_relation": [{**r, "paraphrases": [], "locality": r["locality"][kept:]} for r in scored],
    }


def held_out_facts(records: list[dict]) -> list[dict]:
    """Each held-out record's own question with its true answer as its one locality probe."""
    return [
        {**r, "paraphrases": [], "locality": [{"prompt": r["prompt"], "answer": r["target_true"]}]}
        for r in records
    ]


def answered(engine, facts: list[dict]) -> list[bool]:
    """Whether each fact's true answer is in the model's greedy chat reply (as eval_edit's generation scores)."""
    requests = [[{"role": "user", "content": fact["prompt"]}] for fact in facts]
    replies = engine.generate(requests, SamplingParams(max_tokens=16, temperature=0.0))
    return [
        fact["target_true"].lower() in reply.text.lower() for fact, reply in zip(facts, replies, strict=True)
    ]


def unedited_predictions(model, tokenizer, config: EvalEditConfig, sets: dict[str, list[dict]]):
    """Per kind: the frozen-prefix cache of its pairs and the unedited model's locality predictions."""
    caches = {
        kind: prefix_cache(model, tokenizer, probes, config.scoring_prefix_layers, config.batch_size)
        for kind, probes in sets.items()
    }
    references = {
        kind: locality_reference(model, tokenizer, probes, config.batch_size, prefix=caches[kind])
        for kind, probes in sets.items()
    }
    return caches, references


def edited_row(
    config: EvalEditConfig,
    run,
    engine,
    records: list[dict],
    sets: dict[str, list[dict]],
    caches: dict,
    references: dict,
    known: list[dict],
    replay: list[str],
) -> dict:
    """Edit `records` at once with `run`'s editor, as `eval_edit` does, and score every kind of locality."""
    maker = EditSetMaker(engine.model, engine.tokenizer, model_fingerprint(config.model), run.editor, run.editor_dir,
                         run.editor_settings, general_text=replay)
    edit_set, seconds = maker.compute_deltas(editor_records(config, records))
    cached = min(edited_layers(edit_set.deltas)) >= config.scoring_prefix_layers
    with maker.applied(edit_set):
        scores = scored_row(engine, config, sets, caches, references, known, cached)
    return {"editor": run.name, "n_edits": len(records), "seconds": round(seconds, 1), **scores}


def scored_row(
    engine,
    config: EvalEditConfig,
    sets: dict[str, list[dict]],
    caches: dict,
    references: dict,
    known: list[dict] | None,
    cached: bool,
) -> dict:
    """ES of the edited records; per kind of probe, LS and the accuracy against the gold answers; with `known`,
    the share of those facts the model still answers."""
    row: dict = {}
    for kind, probes in sets.items():
        scores = teacher_forced_scores(
            engine.model,
            engine.tokenizer,
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
    if known is not None:
        row["held_out_known"] = {
            "kept": round(sum(answered(engine, known)) / len(known), 4),
            "facts": len(known),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/eval_edit/cpu.yaml")
    parser.add_argument(
        "--editors",
        default="malmen,malmen_preserve,malmen_text,malmen_rounds,ft_kl",
        help="labels of the config's editors, in the order run",
    )
    parser.add_argument(
        "--n-edits", default="1,16,128,1024", help="comma-separated numbers of edits applied at once"
    )
    parser.add_argument(
        "--held-out", type=int, default=884, help="dev records whose questions are scored (884: all)"
    )
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

    identity = {"config": config.model_dump(mode="json"), "held_out": args.held_out, "kinds": list(KINDS)}
    report = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    if report.get("identity") != identity:
        report = {"identity": identity, "rows": {}}
    # the unedited model's row per N: LS 1 by definition, and the gold accuracy that edits should keep
    todo = [
        (name, n)
        for n in sorted(map(int, args.n_edits.split(",")))
        for name in ["unedited", *args.editors.split(",")]
        if f"{name}-{n}" not in report["rows"]
    ]
    if not todo:
        logger.info("every row is already in %s", RESULT)
        return

    engine = HFEngine(EngineConfig(model=config.model, dtype="float32"), device="cpu")
    model, tokenizer = engine.model, engine.tokenizer
    all_records = load_all_records(config)
    _, replay = edit_eval_texts(config.general.ppl_texts, config.replay_texts)
    facts = held_out_facts(load_records(config.data, "dev")[: args.held_out])
    # the held-out facts do not depend on N: the unedited model's predictions and answers are computed once
    fixed = {"held_out_facts": facts}
    fixed_caches, fixed_references = unedited_predictions(model, tokenizer, config, fixed)
    known = [fact for fact, hit in zip(facts, answered(engine, facts), strict=True) if hit]
    if not known:
        raise SystemExit(
            f"the unedited model answers none of the {len(facts)} held-out facts: raise --held-out"
        )
    logger.info("the unedited model answers %d of %d held-out facts", len(known), len(facts))
    for n in sorted({n for _, n in todo}):
        records = all_records[:n]
        edited_sets = edited_probe_sets(config, records)
        caches, references = unedited_predictions(model, tokenizer, config, edited_sets)
        sets, caches, references = (
            {**edited_sets, **fixed},
            {**caches, **fixed_caches},
            {**references, **fixed_references},
        )
        for name in [name for name, m in todo if m == n]:
            if name == "unedited":
                baseline = scored_row(engine, config, sets, caches, references, None, cached=True)
                # every known fact is answered by the unedited model: that is how they were chosen
                baseline["held_out_known"] = {"kept": 1.0, "facts": len(known)}
                report["rows"][f"{name}-{n}"] = {"editor": name, "n_edits": len(records), **baseline}
            else:
                report["rows"][f"{name}-{n}"] = edited_row(
                    config, runs[name], engine, records, sets, caches, references, known, replay
                )
            report["machine"] = machine_info()
            atomic_write_text(RESULT, json.dumps(report, indent=2) + "\n")
            logger.info("%s at N=%d: %s", name, n, json.dumps(report["rows"][f"{name}-{n}"]))
    for name, row in report["rows"].items():
        print(
            f"{name:<22} ES {row['es']:.3f}  LS neighbours {row['neighbours']['ls']:.3f}  other relation "
            f"{row['other_relation']['ls']:.3f}  held-out facts {row['held_out_facts']['ls']:.3f}  known facts "
            f"kept {row['held_out_known']['kept']:.3f}"
        )
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
