"""Training questions for the passage compressor, made from the corpus itself (never from FanOutQA).

Each question is a cloze: one sentence of a Wikipedia intro with a span blanked out, asked about its page
("About Eiffel Tower, fill in the blank: The tower was completed in ____."), and the span is the answer. Spans
are years and proper-noun phrases that are not part of the page title (blanking the title would make the
question about nothing). Pages that are the evidence of any FanOutQA question (dev split included) are left out,
and `pages` keeps to one side of the RAG evaluation's page split (`trustray.data.rag_eval`): "train" for compressor
training, "eval" for the evaluation's own cloze questions. Deterministic for a seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from typing import Any, Literal

from trustray.core.rag.passages import split_sentences
from trustray.data.corpus import load_wiki_corpus
from trustray.data.qa import load_fanoutqa_single_hop

BLANK = "____"
YEAR = re.compile(r"\b(1[0-9]{3}|20[0-2][0-9])\b")
# Two or more capitalised words in a row (e.g. "Gustave Eiffel", "Champ de Mars" is missed: fine).
NAME = re.compile(r"\b([A-Z][a-z]+(?: [A-Z][a-z]+)+)\b")


def _spans(sentence: str, title: str) -> list[str]:
    """Candidate answers in `sentence`: years and multi-word names that share no word with the title."""
    title_words = {word.lower() for word in re.findall(r"\w+", title)}
    spans = YEAR.findall(sentence) + [name for name in NAME.findall(sentence) if not sentence.startswith(name)]
    return [span for span in spans if not title_words & {word.lower() for word in span.split()}]


def evidence_titles() -> set[str]:
    """Titles of the pages any FanOutQA question (dev split included) draws its evidence from."""
    titles = (row["metadata"].get("evidence_title") for row in load_fanoutqa_single_hop())
    return {title for title in titles if title}


PageSide = Literal["all", "train", "eval"]


def build_cloze_questions(count: int, seed: int = 0, max_sentence_words: int = 40, pages: PageSide = "all",
                          exclude_titles: Collection[str] = ()) -> list[dict[str, Any]]:
    """`count` cloze questions `{id, question, golden_answers, title, doc_id, sentence}`, at most one per page.

    `pages`: "train" leaves out the RAG evaluation's pages, "eval" keeps only those, "all" takes any page.
    Pages titled in `exclude_titles` are left out too.
    """
    from trustray.data.rag_eval import is_eval_page

    if pages not in ("all", "train", "eval"):
        raise ValueError(f"pages must be 'all', 'train' or 'eval', got {pages!r}")
    excluded = evidence_titles() | set(exclude_titles)
    docs = sorted((doc for doc in load_wiki_corpus() if doc["title"] not in excluded
                   and (pages == "all" or is_eval_page(doc["id"]) == (pages == "eval"))), key=lambda doc: doc["id"])
    rng = random.Random(seed)
    rng.shuffle(docs)
    questions: list[dict[str, Any]] = []
    for doc in docs:
        if len(questions) == count:
            break
        sentences = [s for s in split_sentences(doc["text"]) if len(s.split()) <= max_sentence_words]
        candidates = [(s, span) for s in sentences for span in _spans(s, doc["title"]) if s.count(span) == 1]
        if not candidates:
            continue
        sentence, span = rng.choice(candidates)
        questions.append({
            "id": f"cloze-{doc['id']}",
            "question": f"About {doc['title']}, fill in the blank: {sentence.replace(span, BLANK)}",
            "golden_answers": [span],
            "title": doc["title"],
            "doc_id": doc["id"],
            "sentence": sentence,
        })
    if len(questions) < count:
        raise ValueError(f"only {len(questions)} cloze questions can be made, {count} were asked for")
    return questions
