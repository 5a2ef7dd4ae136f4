"""Compressors: the budget is respected, the empty (closed-book) path, hand-checked selection."""

from __future__ import annotations

import pytest

from trustray.core.rag.compress import COMPRESSORS, build_compressor, select_within_budget
from trustray.core.rag.prompting import format_passages

PASSAGES = [
    ("Eiffel Tower", "The Eiffel Tower is in Paris. It was built in 1889. It is made of iron."),
    ("Colosseum", "The Colosseum is in Rome. It held gladiator fights. It is an amphitheatre."),
]


def words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def test_select_within_budget_by_hand():
    tokens, scores = [10, 30, 8], [0.9, 0.8, 0.1]
    assert select_within_budget(scores, tokens, 20) == [0, 2]  # 30 does not fit; the next one does
    assert select_within_budget(scores, tokens, 20, empty_score=0.5) == [0]
    assert select_within_budget(scores, tokens, 20, empty_score=0.95) == []  # closed book
    assert select_within_budget(scores, tokens, 0) == []
    with pytest.raises(ValueError):
        select_within_budget(scores, tokens, -1)


def test_none_keeps_everything_and_counts_tokens():
    result = build_compressor("none", count_tokens=words).compress("q", PASSAGES, budget=0)
    assert result.passages == PASSAGES and result.context_tokens == result.source_tokens == words(format_passages(PASSAGES))


@pytest.mark.parametrize("budget", [0, 3, 7, 12, 25, 1000])
def test_truncate_respects_the_budget(budget):
    result = build_compressor("truncate", count_tokens=words).compress("q", PASSAGES, budget)
    assert result.context_tokens <= budget
    assert result.context_tokens == (words(format_passages(result.passages)) if result.passages else 0)
    source = dict(PASSAGES)
    for title, text in result.passages:  # a passage whose title alone does not fit its share is left out
        assert source[title].startswith(text) and text
    if budget >= result.source_tokens:
        assert result.passages == PASSAGES


def test_extractive_keeps_the_best_sentences_or_nothing():
    def scorer(question, sentences):
        return [1.0 if "1889" in s else 0.5 if "Rome" in s else 0.0 for s in sentences], 0.2

    compressor = build_compressor("extractive", count_tokens=words, scorer=scorer)
    result = compressor.compress("When was it built?", PASSAGES, budget=30)
    assert result.passages == [("Eiffel Tower", "It was built in 1889."), ("Colosseum", "The Colosseum is in Rome.")]
    assert result.context_tokens <= 30 < result.source_tokens
    tight = compressor.compress("When was it built?", PASSAGES, budget=9)
    assert tight.passages == [("Eiffel Tower", "It was built in 1889.")] and tight.context_tokens <= 9

    def nothing_helps(question, sentences):
        return [0.0] * len(sentences), 0.5

    empty = build_compressor("extractive", count_tokens=words, scorer=nothing_helps).compress("q", PASSAGES, 100)
    assert empty.empty and empty.context_tokens == 0 and empty.source_tokens > 0


def test_registry_names_and_errors():
    assert {"none", "truncate", "extractive"} <= set(COMPRESSORS)
    with pytest.raises(ValueError, match="available"):
        build_compressor("zip", count_tokens=words)
