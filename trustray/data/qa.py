"""Question answering data in FlashRAG's JSONL shape `{id, question, golden_answers: [str], metadata: {...}}`.

The bundled source is FanOutQA's dev set (PyPI `fanoutqa`): its multi-hop questions decompose into single-hop
questions, each with an answer and the Wikipedia page holding the evidence.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from trustray.data.io import read_table, require_columns
from trustray.runtime import package_folder

logger = logging.getLogger(__name__)

FANOUTQA_PACKAGE = "fanoutqa"
FANOUTQA_DEV_FILE = "data/fanout-final-dev.json"
RAG_DEV_SOURCE = "rag_dev"
FANOUTQA_SOURCE = "fanoutqa"
RAG_DEV_IDS_FILE = "rag_dev_ids.txt"
RAG_EVAL_SOURCES = {"rag_eval_tune": "tune", "rag_eval_report": "report"}


def golden_answers(answer: Any) -> list[str]:
    """Flatten a FanOutQA answer (str, number, bool, list or dict of those) to a list of distinct strings."""
    if isinstance(answer, bool):
        # Yes/no questions ("Was X born in Y?"): the words a model would answer with, not "True"/"False".
        values = ["yes" if answer else "no"]
    elif isinstance(answer, (str, int, float)):
        values = [str(answer)]
    elif isinstance(answer, list):
        values = [text for item in answer for text in golden_answers(item)]
    elif isinstance(answer, dict):
        values = [text for item in answer.values() for text in golden_answers(item)]
    elif answer is None:
        values = []
    else:
        raise TypeError(f"unsupported answer type {type(answer).__name__}: {answer!r}")
    return list(dict.fromkeys(value.strip() for value in values if value.strip()))


def _walk_single_hop(node: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    for child in node.get("decomposition") or []:
        if child.get("decomposition"):
            _walk_single_hop(child, rows)
            continue
        rows.append(
            {
                "id": child["id"],
                "question": child["question"],
                "golden_answers": golden_answers(child.get("answer")),
                "metadata": {
                    "evidence_title": (child.get("evidence") or {}).get("title"),
                    "parent_id": node["id"],
                },
            }
        )


def load_fanoutqa_single_hop() -> list[dict[str, Any]]:
    """Every single-hop question of FanOutQA dev (leaves of the decomposition trees), deduplicated by id.

    Identical sub-questions ("What is the capital of China?") recur under several parents with the same id;
    the first occurrence is kept. Questions whose answer is empty are skipped.
    """
    path = package_folder(FANOUTQA_PACKAGE) / FANOUTQA_DEV_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall fanoutqa==1.1.1 (--no-deps)")
    rows: list[dict[str, Any]] = []
    for question in json.loads(path.read_text(encoding="utf-8")):
        _walk_single_hop(question, rows)
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row["id"], row)
    # A question without a gold answer cannot be scored (one in dev 1.1.1: an empty string).
    answered = [row for row in unique.values() if row["golden_answers"]]
    logger.debug(
        "FanOutQA dev: %d single-hop questions, %d unique ids, %d without an answer skipped",
        len(rows), len(unique), len(unique) - len(answered),
    )
    return answered


def rag_dev_ids() -> list[str]:
    text = resources.files("trustray.data").joinpath(RAG_DEV_IDS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_rag_dev() -> list[dict[str, Any]]:
    """The RAG dev split: the single-hop questions listed in `rag_dev_ids.txt`, in that file's order."""
    by_id = {row["id"]: row for row in load_fanoutqa_single_hop()}
    ids = rag_dev_ids()
    missing = [qid for qid in ids if qid not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} RAG dev id(s) not found in FanOutQA dev: {missing[:5]}")
    return [by_id[qid] for qid in ids]


def validate_qa_rows(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Check the FlashRAG shape and normalise: string id, non-empty question, list of string answers."""
    require_columns(rows, ("id", "question"), source)
    checked: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, row in enumerate(rows):
        answers = row.get("golden_answers")
        if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{source}: row {number}: golden_answers must be a non-empty list of strings")
        metadata = row.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"{source}: row {number}: metadata must be an object")
        qid = str(row["id"])
        if qid in seen:
            raise ValueError(f"{source}: duplicate id {qid!r}")
        seen.add(qid)
        checked.append({"id": qid, "question": str(row["question"]), "golden_answers": list(answers),
                        "metadata": metadata})
    return checked


def load_qa(source: str | Path = RAG_DEV_SOURCE) -> list[dict[str, Any]]:
    """`"rag_dev"` (46 questions), `"fanoutqa"` (all single-hop dev questions), `"rag_eval_tune"` /
    `"rag_eval_report"` (the evaluation set's parts, `trustray.data.rag_eval`), or a JSONL/Parquet path."""
    if str(source) in RAG_EVAL_SOURCES:
        from trustray.data.rag_eval import load_rag_eval

        return load_rag_eval(RAG_EVAL_SOURCES[str(source)])
    if str(source) == RAG_DEV_SOURCE:
        return load_rag_dev()
    if str(source) == FANOUTQA_SOURCE:
        return load_fanoutqa_single_hop()
    return validate_qa_rows(read_table(source), str(source))
