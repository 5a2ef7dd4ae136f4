"""The LSR-trained sentence scorer on a tiny embedder: shapes, learning a teacher, artifacts refused elsewhere."""

from __future__ import annotations

import pytest
import torch

from trustray.artifacts import ArtifactMismatchError
from trustray.core.rag.compress import build_compressor
from trustray.core.rag.lsr import lsr_loss
from trustray.core.rag.scorer import SentenceScorer

torch.set_num_threads(1)
TOPICS = ["river", "tower", "castle", "forest", "harbour", "bridge"]


def _scorer(folder: str) -> SentenceScorer:
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    return SentenceScorer(SentenceTransformer(folder, device="cpu"), gamma=0.05)


def _task(index: int) -> tuple[str, list[str], torch.Tensor]:
    """A question about one topic, sentences about every topic; the 'chat model' prefers the matching one."""
    topic = TOPICS[index % len(TOPICS)]
    sentences = [f"The {other} is old and famous." for other in TOPICS]
    lm = torch.tensor([-3.0] + [0.0 if other == topic else -4.0 for other in TOPICS])
    return f"Tell me about the {topic}.", sentences, lm


def test_logits_mask_and_the_empty_column(tiny_embedder_dir):
    scorer = _scorer(tiny_embedder_dir)
    logits, mask = scorer(["q one", "q two"], [["a", "b", "c"], ["d"]])
    assert logits.shape == mask.shape == (2, 4)
    assert mask.tolist() == [[True, True, True, True], [True, True, False, False]]
    assert logits[:, 0].tolist() == [0.0, 0.0]  # untrained EMPTY head: bias 0
    with torch.no_grad():
        cos = scorer.embed(["q one"]) @ scorer.embed(["a"]).T
    assert logits[0, 1].item() == pytest.approx(cos.item() / 0.05, rel=1e-4)


def test_lsr_training_learns_the_chat_models_preference(tiny_embedder_dir):
    scorer = _scorer(tiny_embedder_dir)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3)
    tasks = [_task(i) for i in range(len(TOPICS))]
    questions, candidates, lm = [t[0] for t in tasks], [t[1] for t in tasks], torch.stack([t[2] for t in tasks])
    first = scorer.lsr_step(optimizer, questions, candidates, lm, beta=0.5)
    for _ in range(60):
        last = scorer.lsr_step(optimizer, questions, candidates, lm, beta=0.5)
    assert last < 0.5 * first
    with torch.no_grad():
        logits, _ = scorer(questions, candidates)
    assert (logits.argmax(dim=1) == lm.argmax(dim=1)).float().mean() >= 5 / 6

    compressor = build_compressor("extractive", count_tokens=lambda text: len(text.split()), scorer=scorer.score)
    passages = [("Places", " ".join(candidates[0]))]
    kept = compressor.compress(questions[0], passages, budget=12)
    assert kept.context_tokens <= 12 and "river" in kept.passages[0][1]


def test_a_scorer_for_another_embedder_is_refused(tiny_embedder_dir, tmp_path):
    scorer = _scorer(tiny_embedder_dir)
    scorer.empty_head.bias.data.fill_(1.5)
    scorer.log_scale.data.fill_(2.0)
    scorer.save(tmp_path / "scorer", {"embedder": "tiny", "embedder_fingerprint": "abc"})
    loaded = SentenceScorer.load(tmp_path / "scorer", "abc")
    assert loaded.empty_head.bias.item() == 1.5 and loaded.log_scale.item() == 2.0
    (loaded_scores, loaded_empty), (scores, empty) = loaded.score("q", ["a", "b"]), scorer.score("q", ["a", "b"])
    assert loaded_scores == pytest.approx(scores, rel=1e-5) and loaded_empty == pytest.approx(empty)
    with pytest.raises(ArtifactMismatchError, match="trained from embedder"):
        SentenceScorer.load(tmp_path / "scorer", "another")
    with pytest.raises(ValueError, match="embedder_fingerprint"):
        scorer.save(tmp_path / "bad", {"embedder": "tiny"})


def test_a_scorer_of_an_older_head_format_is_refused(tiny_embedder_dir, tmp_path):
    """Format 1 kept an unscaled EMPTY logit and a fixed γ: read with today's meaning, its EMPTY choice would shift."""
    scorer = _scorer(tiny_embedder_dir)
    scorer.save(tmp_path / "scorer", {"embedder": "tiny", "embedder_fingerprint": "abc"})
    torch.save({"state": scorer.empty_head.state_dict(), "gamma": 0.05}, tmp_path / "scorer" / "head.pt")
    with pytest.raises(ArtifactMismatchError, match="head format 1"):
        SentenceScorer.load(tmp_path / "scorer", "abc")


def test_a_flat_teacher_is_fitted_by_the_scale_not_by_squashing_the_ranking(tiny_embedder_dir):
    """`calibrate` (scale and EMPTY head only): a teacher flatter than cos/γ lowers the learned scale and raises
    EMPTY, while the ranking of the sentences (from the frozen encoder) is untouched."""
    scorer = _scorer(tiny_embedder_dir)
    tasks = [_task(i) for i in range(len(TOPICS))]
    questions, candidates = [t[0] for t in tasks], [t[1] for t in tasks]
    flat = torch.stack([t[2] for t in tasks]) / 20  # EMPTY a little below the best, every sentence close
    with torch.no_grad():
        before, mask = scorer(questions, candidates)
    initial = lsr_loss(before, flat, mask, 0.5).item()
    encoder = {name: value.clone() for name, value in scorer.encoder.state_dict().items()}
    final = scorer.calibrate(questions, candidates, flat, beta=0.5, steps=200)
    assert final < 0.5 * initial
    assert all(torch.equal(encoder[name], value) for name, value in scorer.encoder.state_dict().items())
    with torch.no_grad():
        after, _ = scorer(questions, candidates)
    assert scorer.gamma > 0.1  # the temperature rose from 0.05
    assert torch.equal(after[:, 1:].argsort(dim=1), before[:, 1:].argsort(dim=1))
    assert (after[:, 0] - after[:, 1:].max(dim=1).values).mean() > (before[:, 0] - before[:, 1:].max(dim=1).values).mean()
