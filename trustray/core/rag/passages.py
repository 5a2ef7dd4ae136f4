"""Sentence-aware passage splitting for retrieval corpora (plain Python).

Passages are whole sentences packed greedily up to a token budget, so a passage never ends mid-sentence
unless one sentence alone is over the budget; such a sentence is cut at word boundaries.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Words that end in a period without ending the sentence (compared lower-case, without the period).
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft vs etc al approx ca cf fig figs no nos vol vols pp ed eds rev gen col lt
    sgt capt cmdr adm gov pres sen rep hon inc ltd co corp bros dept univ assn est jan feb mar apr jun jul aug
    sep sept oct nov dec e.g i.e a.m p.m b.c a.d
    """.split()
)

# Candidate boundary: end punctuation, optional closing quotes/brackets, then whitespace.
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*\s+")
# A sentence may start with a capital, digit, opening quote or bracket (lower case means "not a boundary").
_SENTENCE_START = re.compile(r"[\"'“‘(\[]*[A-Z0-9À-ÖØ-Þ]")
# Dotted acronyms ("U.S.", "U.K.") and single-letter initials ("J.", "R.") do not end sentences.
_ACRONYM = re.compile(r"^(?:[A-Za-z]\.)+$")


def _ends_sentence(text: str, start: int, end: int) -> bool:
    punct = text[start:end].rstrip()
    if punct[0] != "." or len(punct.rstrip("\"'”’)]")) > 1:
        # "?", "!", "…" and runs like "..." end a sentence when the next word starts like one.
        return _SENTENCE_START.match(text, end) is not None
    word = text[:start].rsplit(None, 1)[-1] if text[:start].strip() else ""
    word = word.lstrip("\"'“‘([")
    if word.lower() in ABBREVIATIONS or _ACRONYM.search(word + "."):
        return False
    return _SENTENCE_START.match(text, end) is not None


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences, keeping abbreviations (Dr., U.S., e.g.), initials and decimals intact.

    Joining the result with single spaces gives back the text up to whitespace.
    """
    sentences: list[str] = []
    begin = 0
    for match in _BOUNDARY.finditer(text):
        if _ends_sentence(text, match.start(), match.end()):
            sentence = text[begin : match.end()].strip()
            if sentence:
                sentences.append(sentence)
            begin = match.end()
    tail = text[begin:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _longest_fitting_prefix(parts: list[str], sep: str, max_tokens: int, count_tokens: Callable[[str], int]) -> int:
    """Largest n with count_tokens(sep.join(parts[:n])) <= max_tokens (binary search: the count grows with n)."""
    low, high = 0, len(parts)
    while low < high:
        mid = (low + high + 1) // 2
        if count_tokens(sep.join(parts[:mid])) <= max_tokens:
            low = mid
        else:
            high = mid - 1
    return low


def _cut(parts: list[str], sep: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    pieces: list[str] = []
    while parts:
        n = _longest_fitting_prefix(parts, sep, max_tokens, count_tokens)
        if n == 0:
            if sep == "":
                # A single character over the budget cannot be cut further; keep it rather than lose it.
                n = 1
            else:
                # One word over the budget (a long URL or formula): cut it by characters.
                pieces.extend(_cut(list(parts[0]), "", max_tokens, count_tokens))
                parts = parts[1:]
                continue
        pieces.append(sep.join(parts[:n]))
        parts = parts[n:]
    return pieces


def split_passages(
    text: str,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    overlap_sentences: int = 0,
) -> list[str]:
    """Pack whole sentences greedily into passages of at most `max_tokens` (as counted by `count_tokens`).

    A sentence longer than the budget is cut at word boundaries. With `overlap_sentences` > 0 each passage
    starts with up to that many trailing sentences of the previous one (fewer when they would not fit).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if overlap_sentences < 0:
        raise ValueError(f"overlap_sentences must be >= 0, got {overlap_sentences}")
    units: list[str] = []
    for sentence in split_sentences(text):
        if count_tokens(sentence) <= max_tokens:
            units.append(sentence)
        else:
            units.extend(_cut(sentence.split(), " ", max_tokens, count_tokens))
    passages: list[str] = []
    current: list[str] = []
    for unit in units:
        if current and count_tokens(" ".join([*current, unit])) > max_tokens:
            passages.append(" ".join(current))
            current = current[-overlap_sentences:] if overlap_sentences else []
            while current and count_tokens(" ".join([*current, unit])) > max_tokens:
                current.pop(0)
        current.append(unit)
    if current:
        passages.append(" ".join(current))
    return passages
