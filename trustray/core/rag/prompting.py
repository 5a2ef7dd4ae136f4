"""The retrieval-augmented prompt, shared by the service and the evaluation so both measure the same thing.

The passages and the question go in one user message, passages first, question last. On the dev split with
SmolLM2-135M this beat passages in a system message (67.4 vs 69.6% answer-contained with one passage), and one
passage beat three (58.7%): the small model is distracted by extra text, hence `top_k: 1` in the cpu presets.
"""

from __future__ import annotations

from collections.abc import Sequence

RAG_INSTRUCTION = "Answer the question using the text above, in a few words."
CLOSED_BOOK_INSTRUCTION = "Answer the question in a few words."


def format_passages(passages: Sequence[tuple[str, str]]) -> str:
    """(title, text) pairs as the prompt shows them."""
    return "\n\n".join(f"{title}: {text}" for title, text in passages)


def rag_messages(
    question: str, passages: Sequence[tuple[str, str]], history: Sequence[dict[str, str]] = ()
) -> list[dict[str, str]]:
    """`history` (earlier turns, system messages included) then one user message holding the passages and
    the question; no passages gives the closed-book prompt."""
    if not passages:
        return [*history, *closed_book_messages(question)]
    content = f"{format_passages(passages)}\n\n{RAG_INSTRUCTION}\nQuestion: {question}"
    return [*history, {"role": "user", "content": content}]


def closed_book_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{CLOSED_BOOK_INSTRUCTION}\nQuestion: {question}"}]
