"""Sentence splitting and budgeted passage packing."""

from __future__ import annotations

import pytest

from trustray.core.rag.passages import split_passages, split_sentences
from trustray.data.corpus import load_wiki_corpus


def words(text: str) -> list[str]:
    return text.split()


def chars(text: str) -> str:
    """The text without whitespace: what must survive splitting (a word over budget is cut inside)."""
    return "".join(text.split())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris is big. Rome is old.", ["Paris is big.", "Rome is old."]),
        ("Dr. Smith moved to the U.S. in 1990. He left.", ["Dr. Smith moved to the U.S. in 1990.", "He left."]),
        ("J. R. R. Tolkien wrote books. They sold.", ["J. R. R. Tolkien wrote books.", "They sold."]),
        ("Pi is 3.14 or so. E is 2.72.", ["Pi is 3.14 or so.", "E is 2.72."]),
        ("Is it? Yes! (It is.) \"Quite.\" Done", ["Is it?", "Yes!", "(It is.)", "\"Quite.\"", "Done"]),
        ("Apple Inc. makes phones, e.g. the iPhone. It is rich.",
         ["Apple Inc. makes phones, e.g. the iPhone.", "It is rich."]),
        ("lower case. after a period stays", ["lower case. after a period stays"]),
        ("", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


@pytest.fixture(scope="module")
def count_tokens(tiny_embedder_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_embedder_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_budget_respected_and_no_text_lost(count_tokens):
    docs = [row["text"] for row in load_wiki_corpus(limit=30)]
    for budget in (16, 48, 120):
        for text in docs:
            passages = split_passages(text, budget, count_tokens)
            assert all(count_tokens(passage) <= budget for passage in passages)
            assert chars("".join(passages)) == chars(text)


def test_whole_sentences_when_they_fit():
    count = lambda text: len(text.split())  # noqa: E731
    text = "One two three. Four five. Six seven eight nine. Ten."
    assert split_passages(text, 5, count) == ["One two three. Four five.", "Six seven eight nine. Ten."]


def test_long_sentence_cut_by_words():
    count = lambda text: len(text.split())  # noqa: E731
    text = "Short one. " + " ".join(f"w{i}" for i in range(10)) + ". Tail here."
    passages = split_passages(text, 4, count)
    assert len(passages) == 4  # 2 + 10 + 2 words; pieces of the long sentence pack with neighbours
    assert all(count(passage) <= 4 for passage in passages)
    assert words(" ".join(passages)) == words(text)


def test_overlap_sentences():
    count = lambda text: len(text.split())  # noqa: E731
    text = "Aa bb cc. Dd ee ff. Gg hh ii. Jj kk ll."
    assert split_passages(text, 6, count, overlap_sentences=1) == [
        "Aa bb cc. Dd ee ff.", "Dd ee ff. Gg hh ii.", "Gg hh ii. Jj kk ll."
    ]


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens"):
        split_passages("x", 0, len)
    with pytest.raises(ValueError, match="overlap_sentences"):
        split_passages("x", 5, len, overlap_sentences=-1)
