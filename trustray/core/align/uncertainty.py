"""Scores of how unsure a model is about a pair or a response, other than the reward ensemble's disagreement.

- **Mahalanobis OOD score** (Lee et al. 2018): the squared Mahalanobis distance of a feature vector from the
  training features' mean under their covariance (shrunk towards its diagonal so it stays invertible with few
  rows). The **relative** variant (Ren et al. 2021) subtracts the distance under a background Gaussian fitted on
  generic text, so what is merely unusual text is not counted as unusual for the task.
- **DPO's implicit reward margin** (Rafailov et al. 2023; the certainty of Muldrew et al. 2024):
  β[(log π(a|x) − log π_ref(a|x)) − (log π(b|x) − log π_ref(b|x))], from summed response log-probabilities.
- **The policy's predictive entropy of a prompt** (Muldrew et al. 2024's prompt-level acquisition): the Monte
  Carlo estimate −(1/S) Σₛ log π(yₛ|x) from S completions sampled from π, optionally per token (dividing each
  completion's log-probability by its length, so long answers are not counted as uncertain for being long).
- **AUROC**, to check an OOD score separates held-out data from training data.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GaussianFeatures:
    """Mean and (shrunk) inverse covariance of a feature set; `distance` is the squared Mahalanobis distance."""

    def __init__(self, features: Tensor, shrinkage: float = 0.1) -> None:
        if features.dim() != 2 or len(features) < 2:
            raise ValueError(f"need a [n >= 2, d] feature matrix, got {tuple(features.shape)}")
        if not 0 <= shrinkage <= 1:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        x = features.double()
        self.mean = x.mean(dim=0)
        centred = x - self.mean
        covariance = centred.T @ centred / (len(x) - 1)
        diagonal = torch.diag(torch.diagonal(covariance)).clamp_min(1e-8)
        shrunk = (1 - shrinkage) * covariance + shrinkage * diagonal
        self.precision = torch.linalg.pinv(shrunk, hermitian=True)

    def distance(self, features: Tensor) -> Tensor:
        centred = features.double() - self.mean
        return torch.einsum("nd,de,ne->n", centred, self.precision, centred)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "precision": self.precision}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> GaussianFeatures:
        gaussian = cls.__new__(cls)
        gaussian.mean, gaussian.precision = state["mean"], state["precision"]
        return gaussian


class MahalanobisOOD:
    """OOD score of features against a task's training features; `relative_to` generic-text features makes it
    the relative Mahalanobis distance."""

    def __init__(self, in_distribution: Tensor, relative_to: Tensor | None = None, shrinkage: float = 0.1) -> None:
        self.task = GaussianFeatures(in_distribution, shrinkage)
        self.background = GaussianFeatures(relative_to, shrinkage) if relative_to is not None else None

    def score(self, features: Tensor) -> Tensor:
        """Higher is further from the task's data, [n]."""
        distance = self.task.distance(features)
        return distance - self.background.distance(features) if self.background is not None else distance


def implicit_reward_margin(policy_a: Tensor, reference_a: Tensor, policy_b: Tensor, reference_b: Tensor,
                           beta: float) -> Tensor:
    """β·[(log π(a) − log π_ref(a)) − (log π(b) − log π_ref(b))] per pair, from summed response log-probs."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return beta * ((policy_a - reference_a) - (policy_b - reference_b))


def predictive_entropy(sampled_token_logprobs: list[list[float]], per_token: bool = True) -> float:
    """Entropy estimate of π(·|x) from the token log-probabilities of completions sampled from π (see above)."""
    if not sampled_token_logprobs or any(not completion for completion in sampled_token_logprobs):
        raise ValueError("need at least one sampled completion, each with at least one token log-probability")
    totals = [sum(completion) / (len(completion) if per_token else 1) for completion in sampled_token_logprobs]
    return -sum(totals) / len(totals)


def auroc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of `scores` for the binary `positives` (ties count one half)."""
    s, y = scores.double().flatten(), positives.bool().flatten()
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
