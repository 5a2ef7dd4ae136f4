"""The LM-supervised (LSR) objective of REPLUG, used to train the extractive compressor's sentence scorer.

For one question the scorer gives logits over its candidates (the EMPTY option first, then sentences); the chat
model gives each candidate a score ℓ_j = log p_chat(answer | question, candidate) (for EMPTY: closed book). The
target Q = softmax(ℓ / β) says which candidates make the gold answer likely; the scorer's P = softmax(logits) is
pulled towards it by KL(Q ‖ P). Its gradient with respect to the logits is simply P − Q; the chat model's side is a
constant (no gradient flows into it). Masked entries (padding candidates) take no part in either distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from trustray.core.rag.passages import split_sentences
from trustray.core.rag.prompting import closed_book_messages, rag_messages


def lsr_loss(scorer_logits: Tensor, lm_logprobs: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Mean over questions of KL(Q ‖ P), P = softmax(scorer_logits), Q = softmax(lm_logprobs / β), both `[B, C]`.

    `mask` `[B, C]` is True for real candidates; every row needs at least one.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if scorer_logits.shape != lm_logprobs.shape or scorer_logits.shape != mask.shape:
        raise ValueError(f"shapes differ: logits {tuple(scorer_logits.shape)}, lm {tuple(lm_logprobs.shape)}, "
                         f"mask {tuple(mask.shape)}")
    mask = mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("every question needs at least one unmasked candidate")
    minus_inf = torch.finfo(scorer_logits.dtype).min
    log_p = torch.log_softmax(scorer_logits.masked_fill(~mask, minus_inf), dim=1)
    with torch.no_grad():
        log_q = torch.log_softmax((lm_logprobs.detach() / beta).masked_fill(~mask, minus_inf), dim=1)
        q = log_q.exp() * mask
    # q·(log q − log p) on real candidates only; masked entries contribute exactly 0.
    terms = torch.where(mask, q * (log_q - log_p), torch.zeros_like(log_p))
    return terms.sum(dim=1).mean()


def teacher_requests(question: str, candidates: Sequence[tuple[str, str]]) -> list[list[dict[str, str]]]:
    """The chat requests a teacher scores, column for column with the scorer: EMPTY (closed book), then each
    `(title, sentence)` candidate alone in the RAG prompt."""
    return [closed_book_messages(question)] + [rag_messages(question, [candidate]) for candidate in candidates]


def teacher_logprobs(engine: Any, question: str, answer: str, candidates: Sequence[tuple[str, str]]) -> list[float]:
    """ℓ_j = mean per-token log p_chat(answer | request_j) for EMPTY and every candidate (the LSR target's input).

    `engine` is anything with the engine protocol's `render(request)` and `score(prompts, continuations)`; the
    mean (not the sum) keeps answers of different lengths on one scale.
    """
    return teacher_logprobs_batch(engine, [(question, answer, candidates)])[0]


def teacher_logprobs_batch(engine: Any, examples: Sequence[tuple[str, str, Sequence[tuple[str, str]]]]) -> list[list[float]]:
    """`teacher_logprobs` for many `(question, answer, candidates)` in one `score` call, so the engine fills its
    batches across questions. Prompts go shortest first (less padding) and come back in the examples' order."""
    prompts: list[str] = []
    answers: list[str] = []
    sizes: list[int] = []
    for question, answer, candidates in examples:
        rendered = [engine.render(request) for request in teacher_requests(question, candidates)]
        prompts += rendered
        answers += [answer] * len(rendered)
        sizes.append(len(rendered))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
    scores = engine.score([prompts[i] for i in order], [answers[i] for i in order])
    means = [0.0] * len(prompts)
    for position, tokens in zip(order, scores, strict=True):
        means[position] = sum(tokens) / len(tokens)
    result, start = [], 0
    for size in sizes:
        result.append(means[start : start + size])
        start += size
    return result


def lsr_candidates(passages: Sequence[tuple[str, str]], limit: int, source: tuple[str, str] | None = None,
                   drop_source: bool = False) -> list[tuple[str, str]]:
    """The `(title, sentence)` candidates of one training question: the retrieved passages' sentences in
    retrieval order, split as the extractive compressor splits them, repeats removed, at most `limit`.

    `source` (the sentence the question was made from) is made sure to be among them, or, with `drop_source`,
    removed: then only other sentences or EMPTY can help, which keeps the scorer from learning word overlap alone.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    source_text = source[1] if source else None
    candidates: list[tuple[str, str]] = []
    seen: set[str] = set()
    for title, text in passages:
        for sentence in split_sentences(text):
            if sentence in seen or (drop_source and sentence == source_text):
                continue
            seen.add(sentence)
            candidates.append((title, sentence))
    candidates = candidates[:limit]
    if source and not drop_source and source_text not in {sentence for _, sentence in candidates}:
        candidates = [*candidates[: limit - 1], source]
    return candidates


def teacher_summary(lm_logprobs: Sequence[Sequence[float]], beta: float) -> dict[str, float]:
    """How the teacher's targets look over a set of questions (column 0 = EMPTY): how often closed book is its
    best choice, the mean entropy of Q = softmax(ℓ / β) in nats next to that of a uniform choice (β too small
    makes Q one-hot, entropy near 0; too large makes it uniform), and the mean number of candidates."""
    if not lm_logprobs:
        raise ValueError("no questions to summarise")
    empty_best, entropy, uniform, width = 0, 0.0, 0.0, 0
    for row in lm_logprobs:
        values = torch.tensor(row, dtype=torch.float64)
        log_q = torch.log_softmax(values / beta, dim=0)
        empty_best += int(values.argmax().item() == 0)
        entropy += float(-(log_q.exp() * log_q).sum())
        uniform += math.log(len(row))
        width += len(row) - 1
    count = len(lm_logprobs)
    return {"questions": count, "empty_best_fraction": empty_best / count, "mean_teacher_entropy": entropy / count,
            "mean_uniform_entropy": uniform / count, "mean_candidates": width / count}
