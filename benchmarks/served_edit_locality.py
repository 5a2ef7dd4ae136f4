"""Does an edit made through `/v1/edits` keep unrelated answers? The served editor's choices, measured.

For each editor, with the Serve editor's defaults (`EditServeConfig()`: default editor settings, default locality
anchors for an editor held to locality, replay of Wikipedia intros outside the edit evaluation's pool, preserved
conversations for memit), this applies edits as a user sends them (prompt and new answer only, through
`EditItem.record`):

- 1 edit: "What is the capital of France?" -> "Lyon";
- 16 edits in one request: the first 16 bundled train records (prompt, target_new).

and measures ES by generation (the new answer contained in the greedy reply to the edited prompt, 16 tokens), the
locality check's `locality_kept` on the 50 probe questions (`trustray.data.edits.locality_probe_questions`), the
seconds computing the editor's one-off statistics (`prepare`), the deltas and the check; and the probes' noise
floor: `locality_kept` under random rank-one weight changes of a given size (`noise_floor`).
Writes benchmarks/results/served_edit_locality.json.

`--tune` instead runs memit's settings grid (`TUNING_GRID`) on a separate tuning split: the next 16 train records
(17th to 32nd) and 50 other held-out questions (default anchors that memit's preserved conversations do not use),
and writes benchmarks/results/served_edit_locality_tuning.json. Settings are chosen there, reported here.
Run: .venv/bin/python benchmarks/served_edit_locality.py [--editors ft,ft_kl,memit] [--tune] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from trustray.actors.editor import EditSetMaker
from trustray.artifacts import atomic_write_text
from trustray.core.editing.locality import LocalityCheck, greedy_answers
from trustray.data.corpus import edit_train_texts
from trustray.data.edits import default_locality_anchors, load_edit_split, locality_probe_questions
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging
from trustray.serve_apps.config import EditServeConfig
from trustray.serve_apps.schemas import EditItem

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TUNING_GRID = [
    {"covariance_weight": 1000.0},
    {"covariance_weight": 1000.0, "target_stop_nll": 0.7},
    {"covariance_weight": 1000.0, "target_stop_nll": 1.2},
    {"covariance_weight": 5000.0},
    {"covariance_weight": 5000.0, "target_stop_nll": 0.7},
    {"covariance_weight": 20000.0},
    {"covariance_weight": 20000.0, "target_steps": 120},
    {"covariance_weight": 1000.0, "modules": {"layers": [2, 3, 4, 5, 6, 7, 8, 9, 10]}},
]
NOISE_NORMS = [1.0, 3.0]
NOISE_SEEDS = 3
NOISE_LAYER = 5
logger = logging.getLogger("served_edit_locality")


def requests(tuning: bool = False) -> dict[str, list[dict]]:
    """The edit requests measured (the tuning split's: 16 other records), as the API turns them into records."""
    train = load_edit_split("train", limit=32)
    if tuning:
        items = {"16": [EditItem(prompt=r["prompt"], target_new=r["target_new"]) for r in train[16:]]}
    else:
        items = {"1": [EditItem(prompt="What is the capital of France?", target_new="Lyon")],
                 "16": [EditItem(prompt=r["prompt"], target_new=r["target_new"]) for r in train[:16]]}
    return {name: [item.record(i) for i, item in enumerate(group)] for name, group in items.items()}


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


def measure_edits(maker: EditSetMaker, check: LocalityCheck, records: list[dict], min_kept: float) -> dict:
    deltas, seconds = maker.compute_deltas(maker.anchored(records))
    with maker.applied(deltas):
        began = time.perf_counter()
        locality = check.measure()
        check_seconds = time.perf_counter() - began
        replies = greedy_answers(maker.model, maker.tokenizer, [r["prompt"] for r in records])
    es = sum(r["target_new"].lower() in reply.lower() for r, reply in zip(records, replies, strict=True))
    return {"n_edits": len(records), "es_generation": round(es / len(records), 4), **locality,
            "passes_check": locality["locality_kept"] >= min_kept, "edit_seconds": round(seconds, 1),
            "check_seconds": round(check_seconds, 1), "example_reply": replies[0]}


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


def report(editors: list[str], config: EditServeConfig) -> dict:
    rows, floor = [], []
    for editor in editors:
        maker, prepare_seconds = load_maker(editor, config)
        check = maker.locality_check(locality_probe_questions(config.locality_probes), config.locality_max_new_tokens)
        for records in requests().values():
            row = {"editor": editor, **measure_edits(maker, check, records, config.min_locality_kept),
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
        maker.editor.settings = defaults.model_copy(update=overrides)
        for records in requests(tuning=True).values():
            row = {"settings": overrides, **measure_edits(maker, check, records, config.min_locality_kept)}
            logger.info("%s", row)
            rows.append(row)
    return {"editor": "memit", "split": "tuning: train records 17-32, 50 default anchors outside preserved_chats",
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--editors", default="ft,ft_kl,memit")
    parser.add_argument("--tune", action="store_true", help="run memit's settings grid on the tuning split")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(args.threads)
    config = EditServeConfig()
    body = tune(config) if args.tune else report(args.editors.split(","), config)
    result = {"model": DEFAULT_CHAT_MODEL, "machine": machine_info(), "threads": args.threads,
              "serve_defaults": config.model_dump(include={"editor", "editor_settings", "min_locality_kept",
                                                           "locality_probes", "locality_max_new_tokens",
                                                           "anchors_per_edit", "replay_texts", "preserved_chats"}),
              **body}
    path = RESULTS / ("served_edit_locality_tuning.json" if args.tune else "served_edit_locality.json")
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
