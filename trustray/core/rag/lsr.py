"""The LM-supervised (LSR) objective of REPLUG, used to train the extractive compressor's sentence scorer.

For one question the scorer gives logits over its candidates (the EMPTY option first, then sentences); the chat
model gives each candidate a score ℓ_j = log p_chat(answer | question, candidate) (for EMPTY: closed book). The
target Q = softmax(ℓ / β) says which candidates make the gold answer likely; the scorer's P = softmax(logits) is
pulled towards it by KL(Q ‖ P). Its gradient with respect to the logits is simply P − Q; the chat model's side is a
constant (no gradient flows into it). Masked entries (padding candidates) take no part in either distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

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
    prompts = [engine.render(request) for request in teacher_requests(question, candidates)]
    scores = engine.score(prompts, [answer] * len(prompts))
    return [sum(tokens) / len(tokens) for tokens in scores]
