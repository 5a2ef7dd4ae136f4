"""The RAG evaluation set: big enough, tuning and reporting parts apart, and apart from compressor training."""

from __future__ import annotations

import pytest

from trustray.data import load_qa
from trustray.data.cloze import build_cloze_questions
from trustray.data.corpus import load_wiki_corpus
from trustray.data.rag_eval import is_eval_page, load_rag_eval


@pytest.fixture(scope="module")
def parts():
    return {split: load_rag_eval(split) for split in ("tune", "report")}


def test_sizes_sources_and_gold_pages(parts):
    tune, report = parts["tune"], parts["report"]
    assert len(tune) + len(report) >= 500
    assert {q["metadata"]["source"] for q in tune} == {"cloze"}  # FanOutQA is only ever reported
    assert {q["metadata"]["source"] for q in report} == {"cloze", "fanoutqa"}
    assert sum(q["metadata"]["source"] == "fanoutqa" for q in report) == 102
    pages = {doc["id"]: doc for doc in load_wiki_corpus()}
    from trustray.core.rag.metrics import answer_contained

    for q in tune + report:  # every question's answer is stated on its gold page
        assert answer_contained(pages[q["metadata"]["gold_doc_id"]]["text"], q["golden_answers"]), q
    assert load_qa("rag_eval_tune") == tune and load_qa("rag_eval_report") == report


def test_parts_share_no_page_and_training_never_sees_one(parts):
    tune_pages = {q["metadata"]["gold_doc_id"] for q in parts["tune"]}
    report_cloze = {q["metadata"]["gold_doc_id"] for q in parts["report"] if q["metadata"]["source"] == "cloze"}
    assert not tune_pages & report_cloze and len(tune_pages) == len(parts["tune"])
    assert all(is_eval_page(page) for page in tune_pages | report_cloze)
    training = {q["doc_id"] for q in build_cloze_questions(1024, seed=0, pages="train")}
    evaluated = {q["metadata"]["gold_doc_id"] for q in parts["tune"] + parts["report"]}
    assert not training & evaluated
    with pytest.raises(ValueError, match="split"):
        load_rag_eval("test")
