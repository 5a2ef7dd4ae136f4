"""Passage compressors: what of the retrieved passages reaches the chat model, under a token budget.

A compressor takes the question and the retrieved `(title, text)` passages and returns the passages to put in the
prompt (`Compressed`), with the prompt-token counts before and after (counted on `format_passages`, as the chat
model sees them). An empty result means "no retrieval helps": the caller asks closed book (selective
augmentation). One registry; adding a compressor is one class and one decorator line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from trustray.core.rag.passages import split_sentences
from trustray.core.rag.prompting import format_passages

Passages = Sequence[tuple[str, str]]
TokenCounter = Callable[[str], int]
# (question, candidate sentences) -> (one score per sentence, the score of keeping nothing or None)
SentenceScorer = Callable[[str, Sequence[str]], tuple[Sequence[float], float | None]]


@dataclass(frozen=True)
class Compressed:
    """The passages kept (original order; [] = closed book) and the context tokens before and after."""

    passages: list[tuple[str, str]]
    context_tokens: int
    source_tokens: int

    @property
    def empty(self) -> bool:
        return not self.passages


class Compressor(Protocol):
    name: ClassVar[str]

    def compress(self, question: str, passages: Passages, budget: int) -> Compressed: ...

    def compress_batch(self, questions: Sequence[str], passage_lists: Sequence[Passages],
                       budget: int) -> list[Compressed]: ...


class OneAtATime:
    """`compress_batch` for compressors with nothing to share across questions: one `compress` per question."""

    def compress_batch(self, questions: Sequence[str], passage_lists: Sequence[Passages],
                       budget: int) -> list[Compressed]:
        if len(questions) != len(passage_lists):
            raise ValueError(f"{len(questions)} questions but {len(passage_lists)} passage lists")
        return [self.compress(q, passages, budget) for q, passages in zip(questions, passage_lists, strict=True)]


COMPRESSORS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator adding a compressor to the registry under its `name`."""
    if cls.name in COMPRESSORS:
        raise ValueError(f"compressor {cls.name!r} is registered twice")
    COMPRESSORS[cls.name] = cls
    return cls


def build_compressor(name: str, **options: Any) -> Compressor:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(sorted(COMPRESSORS))}")
    return COMPRESSORS[name](**options)


def context_tokens(count_tokens: TokenCounter, passages: Passages) -> int:
    """Tokens of `passages` as the prompt formats them (0 for none)."""
    return count_tokens(format_passages(passages)) if passages else 0


def _check_budget(budget: int) -> None:
    if budget < 0:
        raise ValueError(f"the token budget must be >= 0, got {budget}")


def select_within_budget(scores: Sequence[float], token_counts: Sequence[int], budget: int,
                         empty_score: float | None = None) -> list[int]:
    """Indices kept, in original order: best score first, skipping what does not fit (the budget is never
    exceeded) and stopping at the first score not above `empty_score` (keeping nothing is better from there)."""
    _check_budget(budget)
    if len(scores) != len(token_counts):
        raise ValueError(f"{len(scores)} scores for {len(token_counts)} token counts")
    kept, used = [], 0
    for index in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if empty_score is not None and scores[index] <= empty_score:
            break
        if used + token_counts[index] <= budget:
            kept.append(index)
            used += token_counts[index]
    return sorted(kept)


@register
@dataclass(frozen=True)
class NoneCompressor(OneAtATime):
    """Every retrieved passage, whole (full RAG); the budget is ignored."""

    name: ClassVar[str] = "none"
    count_tokens: TokenCounter

    def compress(self, question: str, passages: Passages, budget: int) -> Compressed:
        tokens = context_tokens(self.count_tokens, passages)
        return Compressed(list(passages), tokens, tokens)


@register
@dataclass(frozen=True)
class TruncateCompressor(OneAtATime):
    """The first words of each passage, an equal share of the budget each (titles included in the count)."""

    name: ClassVar[str] = "truncate"
    count_tokens: TokenCounter

    def compress(self, question: str, passages: Passages, budget: int) -> Compressed:
        _check_budget(budget)
        source = context_tokens(self.count_tokens, passages)
        kept: list[tuple[str, str]] = []
        for position, (title, text) in enumerate(passages):
            remaining = budget - context_tokens(self.count_tokens, kept)
            share = remaining // (len(passages) - position)
            words = text.split()
            count = longest_prefix(self.count_tokens, title, words, share, separator_tokens=2 if kept else 0)
            if count:
                kept.append((title, " ".join(words[:count])))
        context = context_tokens(self.count_tokens, kept)
        return Compressed(kept, context, source)


def longest_prefix(count_tokens: TokenCounter, title: str, words: list[str], share: int, separator_tokens: int = 0) -> int:
    """Most words of a passage whose `title: words` fits in `share` tokens (binary search on the count)."""
    low, high = 0, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(format_passages([(title, " ".join(words[:middle]))])) + separator_tokens <= share:
            low = middle
        else:
            high = middle - 1
    return low


@register
@dataclass(frozen=True)
class ExtractiveCompressor(OneAtATime):
    """The best-scored sentences of all passages within the budget, each kept under its passage's title; nothing
    when the scorer's EMPTY score beats every sentence."""

    name: ClassVar[str] = "extractive"
    count_tokens: TokenCounter
    scorer: SentenceScorer

    def compress(self, question: str, passages: Passages, budget: int) -> Compressed:
        _check_budget(budget)
        source = context_tokens(self.count_tokens, passages)
        candidates = [(p, sentence) for p, (_, text) in enumerate(passages) for sentence in split_sentences(text)]
        if not candidates:
            return Compressed([], 0, source)
        scores, empty_score = self.scorer(question, [sentence for _, sentence in candidates])
        # A sentence costs its own tokens plus, for the first of its passage, the title and separator.
        costs = [self.count_tokens(sentence) + self.count_tokens(f"{passages[p][0]}: ") + 2 for p, sentence in candidates]
        chosen = select_within_budget(scores, costs, budget, empty_score)
        kept: list[tuple[str, str]] = []
        for p in sorted({candidates[i][0] for i in chosen}):
            kept.append((passages[p][0], " ".join(candidates[i][1] for i in chosen if candidates[i][0] == p)))
        while kept and self.count_tokens(format_passages(kept)) > budget:  # tokenizer merges can add a token
            kept.pop()
        context = context_tokens(self.count_tokens, kept)
        return Compressed(kept, context, source)


# (questions, their passage lists) -> the summary the abstractive model writes for each ("" = keep nothing)
Summarize = Callable[[Sequence[str], Sequence[Passages]], list[str]]


@register
@dataclass(frozen=True)
class AbstractiveCompressor:
    """A summary written by a small LM (`trustray.core.rag.abstractive.Summarizer`), cut to the budget; nothing
    when it writes nothing. The summary reaches the chat model as one passage titled `title`. A batch of questions is
    summarized in one generation call."""

    name: ClassVar[str] = "abstractive"
    title: ClassVar[str] = "Summary"
    count_tokens: TokenCounter
    summarize: Summarize

    def compress(self, question: str, passages: Passages, budget: int) -> Compressed:
        return self.compress_batch([question], [passages], budget)[0]

    def compress_batch(self, questions: Sequence[str], passage_lists: Sequence[Passages],
                       budget: int) -> list[Compressed]:
        _check_budget(budget)
        if len(questions) != len(passage_lists):
            raise ValueError(f"{len(questions)} questions but {len(passage_lists)} passage lists")
        asked = [row for row, passages in enumerate(passage_lists) if passages]
        written = self.summarize([questions[row] for row in asked], [passage_lists[row] for row in asked]) if asked else []
        summaries = dict(zip(asked, written, strict=True))
        return [self._cut(summaries.get(row, ""), passages, budget) for row, passages in enumerate(passage_lists)]

    def _cut(self, summary: str, passages: Passages, budget: int) -> Compressed:
        source = context_tokens(self.count_tokens, passages)
        words = summary.split()
        count = longest_prefix(self.count_tokens, self.title, words, budget)
        if not count:
            return Compressed([], 0, source)
        kept = [(self.title, " ".join(words[:count]))]
        return Compressed(kept, self.count_tokens(format_passages(kept)), source)
