"""Cloze training questions: deterministic, answerable from their sentence, never about FanOutQA evidence pages."""

from __future__ import annotations

from trustray.data.cloze import BLANK, build_cloze_questions, evidence_titles


def test_cloze_questions_are_deterministic_and_well_formed():
    questions = build_cloze_questions(200, seed=0)
    assert questions == build_cloze_questions(200, seed=0)
    assert questions != build_cloze_questions(200, seed=1)
    assert len({q["id"] for q in questions}) == 200
    for q in questions:
        answer = q["golden_answers"][0]
        assert q["question"].count(BLANK) == 1 and answer not in q["question"].split(": ", 1)[1]
        assert q["sentence"].replace(answer, BLANK) in q["question"]
        assert not set(answer.lower().split()) & set(q["title"].lower().split())


def test_no_question_uses_a_fanoutqa_evidence_page():
    excluded = evidence_titles()
    assert excluded  # the dev split's pages are among them
    assert not {q["title"] for q in build_cloze_questions(300, seed=2)} & excluded
