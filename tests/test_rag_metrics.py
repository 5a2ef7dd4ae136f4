import pytest

from trustray.core.rag.metrics import answer_contained, exact_match, normalize_answer, score_answers, token_f1
from trustray.core.rag.prompting import closed_book_messages, format_passages, rag_messages


def test_normalize_strips_case_punctuation_articles():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"


def test_exact_match_takes_best_golden():
    assert exact_match("Redmond", ["Seattle", "redmond."]) == 1.0
    assert exact_match("Redmond, Washington", ["Redmond"]) == 0.0


def test_token_f1_by_hand():
    # prediction tokens {redmond, washington, usa}, gold {redmond, washington}: P=2/3, R=1 → F1=0.8
    assert token_f1("Redmond, Washington, USA", ["Redmond, Washington"]) == pytest.approx(0.8)
    assert token_f1("nothing", ["Redmond"]) == 0.0
    assert token_f1("Redmond", ["Paris", "Redmond"]) == 1.0


def test_answer_contained():
    assert answer_contained("It is in Redmond, Washington.", ["Redmond"]) == 1.0
    assert answer_contained("It is in Seattle.", ["Redmond"]) == 0.0
    assert answer_contained("anything", [""]) == 0.0


def test_score_answers_means():
    scores = score_answers(["Paris", "Rome is it", "no"], [["Paris"], ["Rome"], ["Oslo"]])
    assert scores["em"] == pytest.approx(1 / 3)
    assert scores["contains"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError):
        score_answers([], [])


def test_rag_prompt_holds_passages_then_question():
    messages = rag_messages("Who?", [("Title A", "text a"), ("Title B", "text b")])
    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert content.startswith("Title A: text a\n\nTitle B: text b") and content.endswith("Question: Who?")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert rag_messages("Who?", [("T", "x")], history)[:2] == history
    assert rag_messages("Who?", []) == closed_book_messages("Who?")
    assert format_passages([]) == ""
