"""Does an edit made through `/v1/edits` keep unrelated answers? The served editor's choices, measured.

For each editor, with the Serve editor's defaults (`EditServeConfig()`: default editor settings, default locality
anchors for an editor held to locality, replay of Wikipedia intros outside the edit evaluation's pool), this applies
edits as a user sends them (prompt and new answer only, through `EditItem.record`):

- 1 edit: "What is the capital of France?" -> "Lyon";
- 16 edits in one request: the first 16 bundled train records (prompt, target_new).

and measures ES by generation (the new answer contained in the greedy reply to the edited prompt, 16 tokens), the
locality check's `locality_kept` on the 50 probe questions (`trustray.data.edits.locality_probe_questions`), the
seconds computing the deltas and the seconds of the check. Writes benchmarks/results/served_edit_locality.json.
Run: .venv/bin/python benchmarks/served_edit_locality.py [--editors ft,ft_kl] [--threads 2]
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
from trustray.core.editing.locality import greedy_answers
from trustray.data.corpus import edit_train_texts
from trustray.data.edits import default_locality_anchors, load_edit_split, locality_probe_questions
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging
from trustray.serve_apps.config import EditServeConfig
from trustray.serve_apps.schemas import EditItem

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "served_edit_locality.json"
logger = logging.getLogger("served_edit_locality")


def requests() -> dict[str, list[dict]]:
    """The edit requests measured, as the API turns them into records."""
    single = [EditItem(prompt="What is the capital of France?", target_new="Lyon")]
    bundled = [EditItem(prompt=r["prompt"], target_new=r["target_new"]) for r in load_edit_split("train", limit=16)]
    return {name: [item.record(i) for i, item in enumerate(items)]
            for name, items in (("1", single), ("16", bundled))}


def measure(editor: str, config: EditServeConfig, source: str) -> list[dict]:
    maker = EditSetMaker.load(
        source, model_fingerprint(source), editor, None, config.editor_settings, "cpu",
        general_text=edit_train_texts(config.replay_texts),
        default_anchors=default_locality_anchors(config.locality_probes),
        anchors_per_edit=config.anchors_per_edit,
    )
    check = maker.locality_check(locality_probe_questions(config.locality_probes), config.locality_max_new_tokens)
    rows = []
    for n_edits, records in requests().items():
        deltas, seconds = maker.compute_deltas(maker.anchored(records))
        with maker.applied(deltas):
            began = time.perf_counter()
            locality = check.measure()
            check_seconds = time.perf_counter() - began
            replies = greedy_answers(maker.model, maker.tokenizer, [r["prompt"] for r in records])
        es = sum(r["target_new"].lower() in reply.lower() for r, reply in zip(records, replies, strict=True))
        row = {"editor": editor, "n_edits": int(n_edits), "es_generation": round(es / len(records), 4), **locality,
               "passes_check": locality["locality_kept"] >= config.min_locality_kept,
               "edit_seconds": round(seconds, 1), "check_seconds": round(check_seconds, 1),
               "example_reply": replies[0]}
        logger.info("%s", row)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--editors", default="ft,ft_kl")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    torch.set_num_threads(args.threads)
    config = EditServeConfig()
    rows = [row for editor in args.editors.split(",") for row in measure(editor, config, DEFAULT_CHAT_MODEL)]
    result = {"model": DEFAULT_CHAT_MODEL, "machine": machine_info(), "threads": args.threads,
              "serve_defaults": config.model_dump(include={"editor_settings", "min_locality_kept", "locality_probes",
                                                           "locality_max_new_tokens", "anchors_per_edit",
                                                           "replay_texts"}),
              "rows": rows}
    atomic_write_text(RESULT, json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", RESULT)


if __name__ == "__main__":
    main()
