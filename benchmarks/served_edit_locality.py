"""Does an edit made through `/v1/edits` keep unrelated answers? The served editor's choices, measured.

For each editor, with the Serve editor's defaults (`EditServeConfig()`: default editor settings, default locality
anchors for an editor held to locality, replay of Wikipedia intros outside the edit evaluation's pool, preserved
conversations for memit), this applies edits as a user sends them (prompt and new answer only, through
`EditItem.record`):

- 1 edit: "What is the capital of France?" -> "Lyon";
- 16 edits in one request: the first 16 bundled train records (prompt, target_new).

and measures ES by generation (the new answer contained in the greedy reply to the edited prompt, 16 tokens), GS
the same on paraphrases (the records' first two; two written here for the France edit), the locality check's
`locality_kept` on the 50 probe questions (`trustray.data.edits.locality_probe_questions`), `neighbours_kept`
on prompts of the edits' own templates about other subjects (the records' first locality prompt; Germany and
Italy for France), the seconds computing the editor's one-off statistics (`prepare`), the deltas and the check;
and the probes' noise floor: `locality_kept` under random rank-one weight changes of a given size
(`noise_floor`). `memit` is the Serve default (scoped, `trustray.core.editing.scope`); `memit_unscoped` the same
solve applied everywhere, as in the MEMIT paper.
Writes benchmarks/results/served_edit_locality.json.

`--tune` instead runs memit's settings grid (`TUNING_GRID`) on a separate tuning split: the next 16 train records
(17th to 32nd) and 50 other held-out questions (default anchors that memit's preserved conversations do not use),
and writes benchmarks/results/served_edit_locality_tuning.json. Settings are chosen there, reported here.
Run: .venv/bin/python benchmarks/served_edit_locality.py [--editors ft,ft_kl,memit,memit_unscoped] [--tune]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from trustray.actors.editor import EditSetMaker
from trustray.artifacts import atomic_write_text
from trustray.core.editing.editset import EditSet
from trustray.core.editing.locality import LocalityCheck, greedy_answers
from trustray.core.editing.memit import MemitSettings
from trustray.core.editing.scope import EditScope
from trustray.data.corpus import edit_train_texts
from trustray.data.edits import default_locality_anchors, load_edit_split, locality_probe_questions
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging
from trustray.serve_apps.config import EditServeConfig
from trustray.serve_apps.schemas import EditItem

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Editor variants measured: the registered editor and its settings overrides on top of the Serve defaults.
VARIANTS = {"ft": ("ft", {}), "ft_kl": ("ft_kl", {}), "memit": ("memit", {}),
            "memit_unscoped": ("memit", {"scope_threshold": None})}
# The tuning grid: solve settings, each measured at every scope threshold (None: unscoped) on the same deltas.
TUNING_GRID = [{"covariance_weight": 1000.0}, {"covariance_weight": 5000.0}, {"covariance_weight": 300.0}]
SCOPE_THRESHOLDS = [None, 0.3, 0.5, 0.7, 0.9]
FRANCE_PARAPHRASES = ["Which city is the capital of France?", "Name the capital city of France."]
FRANCE_NEIGHBOURS = ["What is the capital of Germany?", "What is the capital of Italy?"]
NOISE_NORMS = [1.0, 3.0]
NOISE_SEEDS = 3
NOISE_LAYER = 5
logger = logging.getLogger("served_edit_locality")


def requests(tuning: bool = False) -> list[dict]:
    """The edit requests measured (the tuning split's: 16 other records): `records` as the API turns them into
    records, `paraphrases` (prompt, new answer) and `neighbours` (same template, other subject) to measure."""
    train = load_edit_split("train", limit=32)

    def bundled(rows: list[dict]) -> dict:
        return {"records": [EditItem(prompt=r["prompt"], target_new=r["target_new"]).record(i)
                            for i, r in enumerate(rows)],
                "paraphrases": [(p, r["target_new"]) for r in rows for p in r["paraphrases"][:2]],
                "neighbours": [r["locality"][0]["prompt"] for r in rows]}

    if tuning:
        return [bundled(train[16:])]
    france = {"records": [EditItem(prompt="What is the capital of France?", target_new="Lyon").record(0)],
              "paraphrases": [(p, "Lyon") for p in FRANCE_PARAPHRASES], "neighbours": FRANCE_NEIGHBOURS}
    return [france, bundled(train[:16])]


def load_maker(editor: str, config: EditServeConfig) -> tuple[EditSetMaker, float]:
    """The Serve editor's worker with the Serve defaults, and the seconds its one-off statistics took."""
    maker = EditSetMaker.load(
        DEFAULT_CHAT_MODEL, model_fingerprint(DEFAULT_CHAT_MODEL), editor, None, config.editor_settings, "cpu",
        general_text=edit_train_texts(config.replay_texts),
        default_anchors=default_locality_anchors(config.locality_probes),
        anchors_per_edit=config.anchors_per_edit, preserved_chats=config.preserved_chats,
    )
    began = time.perf_counter()
    maker.editor.prepare()
    return maker, round(time.perf_counter() - began, 1)


def contained(targets: list[str], replies: list[str]) -> float:
    return round(sum(t.lower() in r.lower() for t, r in zip(targets, replies, strict=True)) / len(targets), 4)


def measure_edits(maker: EditSetMaker, check: LocalityCheck, request: dict, config: EditServeConfig,
                  edit_set: EditSet | None = None, seconds: float = 0.0) -> dict:
    """One edit request's row; `edit_set` (with the seconds it took) when it was computed already."""
    records = request["records"]
    neighbours = maker.locality_check(request["neighbours"], config.locality_max_new_tokens)
    if edit_set is None:
        edit_set, seconds = maker.compute_deltas(maker.anchored(records))
    with maker.applied(edit_set):
        began = time.perf_counter()
        locality = check.measure()
        check_seconds = time.perf_counter() - began
        replies = greedy_answers(maker.model, maker.tokenizer, [r["prompt"] for r in records])
        rephrased = greedy_answers(maker.model, maker.tokenizer, [p for p, _ in request["paraphrases"]])
        neighbours_kept = neighbours.measure()["locality_kept"]
    return {"n_edits": len(records), "es_generation": contained([r["target_new"] for r in records], replies),
            "gs_generation": contained([t for _, t in request["paraphrases"]], rephrased), **locality,
            "neighbours_kept": neighbours_kept, "passes_check": locality["locality_kept"] >= config.min_locality_kept,
            "edit_seconds": round(seconds, 1), "check_seconds": round(check_seconds, 1), "example_reply": replies[0]}


def with_threshold(edit_set: EditSet, threshold: float | None) -> EditSet:
    """The same deltas under another scope threshold (None: unscoped)."""
    if threshold is None:
        return EditSet(edit_set.deltas)
    return EditSet(edit_set.deltas, scope=EditScope(edit_set.scope.keys, threshold))


def noise_floor(maker: EditSetMaker, check: LocalityCheck) -> list[dict]:
    """How fragile the probe answers are: `locality_kept` under random rank-one changes u vᵀ of one down-projection
    (Frobenius norm `NOISE_NORMS`, `NOISE_SEEDS` seeds each): what any weight change of that size costs."""
    weight = maker.model.model.layers[NOISE_LAYER].mlp.down_proj.weight
    name = f"model.layers.{NOISE_LAYER}.mlp.down_proj"
    generator = torch.Generator().manual_seed(0)
    rows = []
    for norm in NOISE_NORMS:
        kept = []
        for _ in range(NOISE_SEEDS):
            change = torch.outer(torch.randn(weight.shape[0], generator=generator),
                                 torch.randn(weight.shape[1], generator=generator))
            with maker.applied({name: change * (norm / change.norm())}):
                kept.append(check.measure()["locality_kept"])
        rows.append({"layer": NOISE_LAYER, "frobenius_norm": norm, "weight_norm": round(float(weight.norm()), 1),
                     "locality_kept": kept})
        logger.info("noise floor %s", rows[-1])
    return rows


def report(variants: list[str], config: EditServeConfig) -> dict:
    rows, floor = [], []
    makers: dict[str, tuple[EditSetMaker, float, LocalityCheck, Any]] = {}
    for variant in variants:
        editor, overrides = VARIANTS[variant]
        if editor not in makers:  # variants of one editor share its loaded model and statistics
            maker, prepare_seconds = load_maker(editor, config)
            makers[editor] = maker, prepare_seconds, maker.locality_check(
                locality_probe_questions(config.locality_probes), config.locality_max_new_tokens), maker.editor.settings
        maker, prepare_seconds, check, served_settings = makers[editor]
        maker.editor.settings = served_settings.model_copy(update=overrides)
        for request in requests():
            row = {"editor": variant, **measure_edits(maker, check, request, config),
                   "prepare_seconds": prepare_seconds}
            logger.info("%s", row)
            rows.append(row)
        floor = floor or noise_floor(maker, check)
    return {"rows": rows, "noise_floor": floor}


def tune(config: EditServeConfig) -> dict:
    maker, _ = load_maker("memit", config)
    anchors = default_locality_anchors(config.locality_probes)[config.preserved_chats:]
    if len(anchors) < config.locality_probes:
        raise ValueError(f"only {len(anchors)} default anchors are left outside memit's preserved conversations")
    check = maker.locality_check([a["prompt"] for a in anchors[: config.locality_probes]],
                                 config.locality_max_new_tokens)
    defaults = maker.editor.settings
    rows = []
    for overrides in TUNING_GRID:
        # Any threshold: it only makes the editor return its keys; each row below sets its own.
        maker.editor.settings = defaults.model_copy(update={**overrides, "scope_threshold": 1.0})
        for request in requests(tuning=True):
            edit_set, seconds = maker.compute_deltas(maker.anchored(request["records"]))
            for threshold in SCOPE_THRESHOLDS:
                row = {"settings": {**overrides, "scope_threshold": threshold},
                       **measure_edits(maker, check, request, config,
                                       with_threshold(edit_set, threshold), seconds)}
                logger.info("%s", row)
                rows.append(row)
    return {"editor": "memit", "split": "tuning: train records 17-32, 50 default anchors outside preserved_chats",
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--editors", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--tune", action="store_true", help="run memit's settings grid on the tuning split")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(args.threads)
    config = EditServeConfig()
    variants = args.editors.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown editors {unknown}; choose from {list(VARIANTS)}")
    body = tune(config) if args.tune else report(variants, config)
    result = {"model": DEFAULT_CHAT_MODEL, "machine": machine_info(), "threads": args.threads,
              "serve_defaults": config.model_dump(include={"editor", "editor_settings", "min_locality_kept",
                                                           "locality_probes", "locality_max_new_tokens",
                                                           "anchors_per_edit", "replay_texts", "preserved_chats"}),
              "memit_defaults": MemitSettings().model_dump(include={"modules", "covariance_weight", "scope_threshold"}),
              **body}
    path = RESULTS / ("served_edit_locality_tuning.json" if args.tune else "served_edit_locality.json")
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
