"""The extractive compressor's sentence scorer: a bi-encoder with an EMPTY option, trained by LSR.

A sentence's logit is s·cos(E(question), E(sentence)) with E the (fine-tuned) sentence embedder, L2-normalised,
and s = exp(log_scale) a learned inverse temperature (initially 1/γ); the EMPTY logit (keep nothing, answer closed
book) is s·h(E(question)) with h a linear head, in the same cosine units, because whether retrieval helps depends on
the question. Untrained, h = 0 keeps EMPTY below any sentence with a positive similarity, so the scorer starts as
plain similarity ranking. Training pulls softmax(logits) towards the chat model's preference over the same
candidates (`trustray.core.rag.lsr.lsr_loss`).

Why the scale and the head are learned apart from the encoder, at their own learning rate (`head_parameters`):
the chat model's preference is much flatter than the untrained cos/0.05 and gives EMPTY some mass. With only
the encoder free (γ fixed, the head at the encoder's 2e-5), the one way to fit that was to squash every
similarity together; measured on the cpu preset, the dev LSR loss fell 2.71 → 0.59 while the scorer's top choice
agreed with the chat model's less (0.67 → 0.53).

An artifact is a folder: the sentence-transformers model (`encoder/`), `head.pt`, and `metadata.json` naming the
embedder it started from (its fingerprint); loading it for another embedder is refused, since its similarities
would not mean the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trustray.artifacts import (
    ArtifactMismatchError,
    atomic_folder,
    read_artifact,
    write_metadata,
)
from trustray.core.rag.lsr import lsr_loss

KIND = "sentence_scorer"
HEAD_FILE = "head.pt"
# Texts embedded per forward pass; batches are cut into chunks of similar length (see `embed`).
EMBED_CHUNK = 32
# head.pt layout; artifacts of another format (e.g. an unscaled EMPTY head) are refused, not misread.
HEAD_FORMAT = 2


class SentenceScorer(nn.Module):
    """logits `[B, 1 + C]` over (EMPTY, sentences) for a batch of questions."""

    def __init__(self, encoder: Any, gamma: float = 0.05) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.encoder = encoder
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / gamma)))
        self.empty_head = nn.Linear(encoder.get_embedding_dimension(), 1)
        nn.init.zeros_(self.empty_head.weight)
        nn.init.zeros_(self.empty_head.bias)

    @property
    def gamma(self) -> float:
        """The current temperature 1/s of the cosine logits."""
        return float(torch.exp(-self.log_scale.detach()))

    def head_parameters(self) -> list[nn.Parameter]:
        """The scale and the EMPTY head: trained at their own learning rate (module docstring)."""
        return [self.log_scale, *self.empty_head.parameters()]

    def embed(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised embeddings `[N, dim]`, differentiable (unlike `SentenceTransformer.encode`).

        Texts run in chunks of similar length: padded to the longest of a whole batch, a few long sentences made
        a training step four times slower on CPU.
        """
        device = next(self.encoder.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        for start in range(0, len(order), EMBED_CHUNK):
            chunk = [texts[i] for i in order[start : start + EMBED_CHUNK]]
            features = {key: value.to(device) if isinstance(value, Tensor) else value
                        for key, value in self.encoder.preprocess(chunk).items()}
            chunks.append(self.encoder(features)["sentence_embedding"])
        embeddings = torch.cat(chunks)[torch.argsort(torch.tensor(order, device=device))]
        return nn.functional.normalize(embeddings, dim=-1)

    def forward(self, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        """(logits [B, 1 + C], mask [B, 1 + C]); column 0 is EMPTY, C the most candidates of any question."""
        if len(questions) != len(candidates):
            raise ValueError(f"{len(questions)} questions but {len(candidates)} candidate lists")
        query = self.embed(questions)
        flat = [sentence for group in candidates for sentence in group]
        sentences = self.embed(flat) if flat else query.new_zeros(0, query.shape[1])
        return self._logits(query, sentences, [len(group) for group in candidates])

    def _logits(self, query: Tensor, sentences: Tensor, counts: Sequence[int]) -> tuple[Tensor, Tensor]:
        """`forward` from embeddings: `query` [B, dim], `sentences` [sum(counts), dim], `counts[b]` per question."""
        width = 1 + max(counts, default=0)
        logits = query.new_full((len(counts), width), torch.finfo(query.dtype).min)
        mask = torch.zeros(len(counts), width, dtype=torch.bool, device=query.device)
        scale = self.log_scale.exp()
        logits[:, 0] = scale * self.empty_head(query).squeeze(-1)
        mask[:, 0] = True
        start = 0
        for row, count in enumerate(counts):
            logits[row, 1 : 1 + count] = scale * (sentences[start : start + count] @ query[row])
            mask[row, 1 : 1 + count] = True
            start += count
        return logits, mask

    def calibrate(self, questions: Sequence[str], candidates: Sequence[Sequence[str]], lm_logprobs: Tensor,
                  beta: float, steps: int = 300, lr: float = 0.05) -> float:
        """Fit the scale and the EMPTY head to the teacher with the encoder frozen; returns the final LSR loss.

        Run before training the encoder: the embeddings are computed once, so hundreds of full-batch steps cost
        less than one encoder step, and the encoder's first gradients then carry the teacher's ranking instead of
        the mismatch of an untrained temperature and abstain option (module docstring).
        """
        with torch.no_grad():
            query = self.embed(questions)
            flat = [sentence for group in candidates for sentence in group]
            sentences = self.embed(flat) if flat else query.new_zeros(0, query.shape[1])
        counts = [len(group) for group in candidates]
        optimizer = torch.optim.Adam(self.head_parameters(), lr=lr)
        for _ in range(steps):
            logits, mask = self._logits(query, sentences, counts)
            loss = lsr_loss(logits, lm_logprobs.to(logits.device)[:, : logits.shape[1]], mask, beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return loss.item()

    @torch.no_grad()
    def score(self, question: str, sentences: Sequence[str]) -> tuple[list[float], float]:
        """(sentence logits, EMPTY logit) for `ExtractiveCompressor`."""
        logits, _ = self([question], [sentences])
        return logits[0, 1 : 1 + len(sentences)].tolist(), float(logits[0, 0])

    def lsr_step(self, optimizer: torch.optim.Optimizer, questions: Sequence[str],
                 candidates: Sequence[Sequence[str]], lm_logprobs: Tensor, beta: float) -> float:
        """One optimizer step on the LSR loss; `lm_logprobs` `[B, 1 + C]` uses the same columns as `forward`."""
        logits, mask = self(questions, candidates)
        loss = lsr_loss(logits, lm_logprobs.to(logits.device)[:, : logits.shape[1]], mask, beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def save(self, folder: str | Path, metadata: Mapping[str, Any]) -> None:
        """Encoder, head and `metadata.json` (must name `embedder_fingerprint`), appearing whole or not at all."""
        if "embedder_fingerprint" not in metadata:
            raise ValueError("scorer metadata must name the embedder_fingerprint it was trained from")
        with atomic_folder(folder) as tmp:
            self.encoder.save(str(tmp / "encoder"))
            torch.save({"format": HEAD_FORMAT, "state": self.empty_head.state_dict(),
                        "log_scale": self.log_scale.detach().cpu()}, tmp / HEAD_FILE)
            write_metadata(tmp, {**metadata, "kind": KIND})

    @classmethod
    def load(cls, folder: str | Path, embedder_fingerprint: str, device: str | None = None) -> SentenceScorer:
        """A saved scorer, refused unless it was trained from the embedder with `embedder_fingerprint`."""
        from sentence_transformers import SentenceTransformer

        metadata = read_artifact(folder, KIND, "sentence scorer")
        if metadata["embedder_fingerprint"] != embedder_fingerprint:
            raise ArtifactMismatchError(
                f"the scorer in {folder} was trained from embedder {metadata.get('embedder', '?')} (fingerprint "
                f"{metadata['embedder_fingerprint']}), not the one given ({embedder_fingerprint})"
            )
        head = torch.load(Path(folder) / HEAD_FILE, map_location="cpu", weights_only=True)
        if head.get("format") != HEAD_FORMAT:
            raise ArtifactMismatchError(f"the scorer in {folder} has head format {head.get('format', 1)}, this "
                                        f"version reads {HEAD_FORMAT}: retrain it (trustray run compressor_train)")
        scorer = cls(SentenceTransformer(str(Path(folder) / "encoder"), device=device))
        scorer.empty_head.load_state_dict(head["state"])
        with torch.no_grad():
            scorer.log_scale.copy_(head["log_scale"])
        return scorer.to(next(scorer.encoder.parameters()).device)
