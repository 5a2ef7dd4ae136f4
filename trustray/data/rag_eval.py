"""The RAG evaluation set: questions answerable from the bundled corpus, split into a tuning and a reporting part.

- **Pages.** One Wikipedia page in `EVAL_PAGE_MODULUS` (by a salted hash of its id) is an evaluation page. Compressor
  training makes its cloze questions from the other pages only (`build_cloze_questions(pages="train")`), so no
  training question, dev question or teacher signal ever comes from a page an evaluation question asks about.
- **tune** (`rag_eval_tune`): `TUNE_CLOZE` cloze questions from evaluation pages. Budgets, prompts, k and
  checkpoints are chosen here only.
- **report** (`rag_eval_report`): `REPORT_CLOZE` further cloze questions from other evaluation pages, plus every
  FanOutQA dev single-hop question whose evidence page is in the corpus and states a gold answer (normalised
  substring). FanOutQA questions are only ever reported, never used to choose anything.

Each row is FlashRAG-shaped, with `metadata: {source: "cloze"|"fanoutqa", split, gold_doc_id}`: the page whose
passages hold the answer, for recall@k.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Literal

EvalSplit = Literal["tune", "report"]
SPLITS: tuple[EvalSplit, ...] = ("tune", "report")
EVAL_PAGE_MODULUS = 8
EVAL_PAGE_SALT = "rag-eval-0"
TUNE_CLOZE = 300
REPORT_CLOZE = 300
CLOZE_SEED = 1


def is_eval_page(doc_id: str) -> bool:
    """Whether a corpus page is reserved for evaluation questions (stable: depends on its id only)."""
    digest = hashlib.sha256(f"{EVAL_PAGE_SALT}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % EVAL_PAGE_MODULUS == 0


def answerable_fanoutqa() -> list[dict[str, Any]]:
    """FanOutQA dev single-hop questions whose evidence page is in the corpus and contains a gold answer."""
    from trustray.core.rag.metrics import answer_contained
    from trustray.data.corpus import load_wiki_corpus
    from trustray.data.qa import load_fanoutqa_single_hop

    pages = {doc["title"]: doc for doc in load_wiki_corpus()}
    rows = []
    for row in load_fanoutqa_single_hop():
        page = pages.get(row["metadata"].get("evidence_title"))
        if page is not None and answer_contained(page["text"], row["golden_answers"]):
            rows.append({**row, "metadata": {**row["metadata"], "source": "fanoutqa", "gold_doc_id": page["id"]}})
    return rows


@lru_cache(maxsize=1)
def _eval_cloze() -> tuple[dict[str, Any], ...]:
    from trustray.data.cloze import build_cloze_questions

    return tuple(build_cloze_questions(TUNE_CLOZE + REPORT_CLOZE, seed=CLOZE_SEED, pages="eval"))


def load_rag_eval(split: EvalSplit) -> list[dict[str, Any]]:
    """The tuning or the reporting questions (see the module docstring), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cloze = _eval_cloze()
    chosen = cloze[:TUNE_CLOZE] if split == "tune" else cloze[TUNE_CLOZE:]
    rows = [{"id": q["id"], "question": q["question"], "golden_answers": list(q["golden_answers"]),
             "metadata": {"source": "cloze", "gold_doc_id": q["doc_id"], "split": split}} for q in chosen]
    if split == "report":
        rows += [{**row, "metadata": {**row["metadata"], "split": split}} for row in answerable_fanoutqa()]
    return rows
