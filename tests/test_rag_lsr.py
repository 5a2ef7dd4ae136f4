"""LSR loss against hand computations: direction, the EMPTY column, masking, no gradient into the chat model."""

from __future__ import annotations

import math

import pytest
import torch

from trustray.core.rag.lsr import lsr_loss


def test_direction_is_kl_of_the_lm_target_from_the_scorer():
    logits = torch.zeros(1, 2, requires_grad=True)
    lm = torch.tensor([[-1.0, -1.0 - 0.5 * math.log(4)]])  # beta 0.5 -> Q = [0.8, 0.2]; P = [0.5, 0.5]
    loss = lsr_loss(logits, lm, torch.ones(1, 2, dtype=torch.bool), beta=0.5)
    assert loss.item() == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), abs=1e-6)  # 0.192745
    assert loss.item() != pytest.approx(0.223144, abs=1e-3)  # KL(P || Q), the swapped direction
    loss.backward()
    assert logits.grad[0].tolist() == pytest.approx([-0.3, 0.3], abs=1e-6)  # P - Q


def test_empty_column_and_masking():
    logits = torch.tensor([[math.log(2), 0.0, 0.0]], requires_grad=True)  # EMPTY first: P = [.5, .25, .25]
    lm = torch.tensor([[0.0, 0.0, math.log(2)]])  # beta 1: Q = [.25, .25, .5]
    loss = lsr_loss(logits, lm, torch.ones(1, 3, dtype=torch.bool), beta=1.0)
    assert loss.item() == pytest.approx(0.25 * math.log(2), abs=1e-6)
    loss.backward()
    assert logits.grad[0].tolist() == pytest.approx([0.25, 0.0, -0.25], abs=1e-6)

    padded = torch.tensor([[math.log(2), 0.0, 0.0, 7.0]], requires_grad=True)
    lm_padded = torch.tensor([[0.0, 0.0, math.log(2), 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    masked_loss = lsr_loss(padded, lm_padded, mask, beta=1.0)
    masked_loss.backward()
    assert masked_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    assert padded.grad[0].tolist() == pytest.approx([0.25, 0.0, -0.25, 0.0], abs=1e-6)


def test_no_gradient_reaches_the_chat_model_and_bad_input_is_refused():
    logits = torch.randn(2, 3, requires_grad=True)
    lm = torch.randn(2, 3, requires_grad=True)
    lsr_loss(logits, lm, torch.ones(2, 3, dtype=torch.bool), beta=0.5).backward()
    assert lm.grad is None and logits.grad is not None
    with pytest.raises(ValueError, match="at least one"):
        lsr_loss(logits, lm, torch.tensor([[True, False, False], [False, False, False]]), beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        lsr_loss(logits, lm, torch.ones(2, 3, dtype=torch.bool), beta=0.0)


def test_teacher_logprobs_are_mean_answer_logprobs_per_candidate(tiny_llama_dir):
    from trustray.core.rag.lsr import teacher_logprobs, teacher_requests
    from trustray.models.engines import EngineConfig
    from trustray.models.hf_engine import HFEngine

    engine = HFEngine(EngineConfig(model=tiny_llama_dir, engine="hf", torch_threads=1), device="cpu")
    candidates = [("Paris", "The tower is in Paris."), ("Rome", "The Colosseum is in Rome.")]
    values = teacher_logprobs(engine, "Where is the tower?", "Paris", candidates)
    requests = teacher_requests("Where is the tower?", candidates)
    assert len(values) == 3 and requests[0][-1]["content"].endswith("Where is the tower?")
    direct = engine.score([engine.render(requests[1])], ["Paris"])[0]
    assert values[1] == pytest.approx(sum(direct) / len(direct))
    assert all(value < 0 for value in values)
