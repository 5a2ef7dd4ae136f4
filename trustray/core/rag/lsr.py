"""The LM-supervised (LSR) objective of REPLUG, used to train the extractive compressor's sentence scorer.

For one question the scorer gives logits over its candidates (the EMPTY option first, then sentences); the chat
model gives each candidate a score ℓ_j = log p_chat(answer | question, candidate) (for EMPTY: closed book). The
target Q = softmax(ℓ / β) says which candidates make the gold answer likely; the scorer's P = softmax(logits) is
pulled towards it by KL(Q ‖ P). Its gradient with respect to the logits is simply P − Q; the chat model's side is a
constant (no gradient flows into it). Masked entries (padding candidates) take no part in either distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
