"""Answer metrics in the SQuAD / FlashRAG convention: normalise, then exact match, token F1, answer contained.
Each metric takes the best over the golden answers."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golden: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(answer) for answer in golden))


def token_f1(prediction: str, golden: Sequence[str]) -> float:
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for answer in golden:
        gold_tokens = normalize_answer(answer).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def answer_contained(prediction: str, golden: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(answer) and normalize_answer(answer) in pred for answer in golden))


def score_answers(predictions: Iterable[str], goldens: Iterable[Sequence[str]]) -> dict[str, float]:
    """Mean exact match, token F1 and answer-contained accuracy (fractions in [0, 1])."""
    rows = [
        (exact_match(p, g), token_f1(p, g), answer_contained(p, g)) for p, g in zip(predictions, goldens, strict=True)
    ]
    if not rows:
        raise ValueError("no predictions to score")
    n = len(rows)
    return {
        "em": sum(r[0] for r in rows) / n,
        "f1": sum(r[1] for r in rows) / n,
        "contains": sum(r[2] for r in rows) / n,
    }
