"""The retrieval-augmented prompt, shared by the service and the evaluation so both measure the same thing."""

from __future__ import annotations

from collections.abc import Sequence

RAG_SYSTEM = (
    "Answer the question using the passages below. Give a short answer, a few words at most."
)
CLOSED_BOOK_SYSTEM = "Answer the question. Give a short answer, a few words at most."


def format_passages(passages: Sequence[tuple[str, str]]) -> str:
    """Number (title, text) pairs the way the prompt shows them."""
    return "\n\n".join(f"[{i}] {title}\n{text}" for i, (title, text) in enumerate(passages, start=1))


def rag_messages(question: str, passages: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Chat messages asking `question` over (title, text) passages; no passages gives the closed-book prompt."""
    if not passages:
        return closed_book_messages(question)
    return [
        {"role": "system", "content": f"{RAG_SYSTEM}\n\n{format_passages(passages)}"},
        {"role": "user", "content": question},
    ]


def closed_book_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": CLOSED_BOOK_SYSTEM}, {"role": "user", "content": question}]
