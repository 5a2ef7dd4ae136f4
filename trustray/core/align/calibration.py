"""Is P(a ≻ b) right as often as it says? ECE, Brier score, NLL, temperature scaling and a reliability table.

The predictions are probabilities p that response a is preferred, the outcomes y ∈ {0, 1} whether it was.
ECE (Guo et al. 2017) bins the confidence max(p, 1 − p) into `bins` equal-width bins over [0, 1] and averages
|accuracy − confidence| weighted by bin size, the prediction being a when p ≥ 0.5. Temperature scaling divides
every head's reward gap by one scalar T chosen to minimise the NLL on a calibration split (never the split
reported); it moves confidence, never the ranking.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPSILON = 1e-12


def _checked(probabilities: Tensor, outcomes: Tensor) -> tuple[Tensor, Tensor]:
    p, y = probabilities.double().flatten(), outcomes.double().flatten()
    if len(p) != len(y) or len(p) == 0:
        raise ValueError(f"need as many predictions as outcomes, at least one; got {len(p)} and {len(y)}")
    if bool(((y != 0) & (y != 1)).any()) or bool(((p < 0) | (p > 1)).any()):
        raise ValueError("outcomes must be 0 or 1 and predictions probabilities in [0, 1]")
    return p, y


def reliability(probabilities: Tensor, outcomes: Tensor, bins: int = 15) -> list[dict[str, float]]:
    """Per non-empty confidence bin: its bounds, count, mean confidence and accuracy (a reliability diagram)."""
    p, y = _checked(probabilities, outcomes)
    confidence = torch.maximum(p, 1 - p)
    correct = ((p >= 0.5).double() == y).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        if bool(members.any()):
            table.append({"lower": b / bins, "upper": (b + 1) / bins, "count": int(members.sum()),
                          "confidence": float(confidence[members].mean()), "accuracy": float(correct[members].mean())})
    return table


def expected_calibration_error(probabilities: Tensor, outcomes: Tensor, bins: int = 15) -> float:
    total = len(probabilities.flatten())
    return sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
               for row in reliability(probabilities, outcomes, bins))


def brier_score(probabilities: Tensor, outcomes: Tensor) -> float:
    p, y = _checked(probabilities, outcomes)
    return float((p - y).square().mean())


def negative_log_likelihood(probabilities: Tensor, outcomes: Tensor) -> float:
    p, y = _checked(probabilities, outcomes)
    p = p.clamp(EPSILON, 1 - EPSILON)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def scaled_probabilities(head_gaps: Tensor, temperature: float) -> Tensor:
    """The mean over heads of σ(gap / T), for gaps [K, n] (or [n], one head)."""
    gaps = head_gaps if head_gaps.dim() == 2 else head_gaps[None]
    return torch.sigmoid(gaps.double() / temperature).mean(dim=0)


def fit_temperature(head_gaps: Tensor, outcomes: Tensor, low: float = 1e-2, high: float = 1e2,
                    steps: int = 80) -> float:
    """The T in [low, high] minimising the NLL of `scaled_probabilities` (golden-section search on log T; the NLL
    of a temperature-scaled Bradley–Terry model is unimodal in log T)."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")

    def nll(log_t: float) -> float:
        return negative_log_likelihood(scaled_probabilities(head_gaps, math.exp(log_t)), outcomes)

    ratio = (math.sqrt(5) - 1) / 2
    a, b = math.log(low), math.log(high)
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)
