"""Selective generation: answer only when the reward model scores the answer high enough, for a chosen risk.

Given answers with a score (the reward ensemble's reward) and whether each is acceptable (the oracle's gold reward
at least a bar), accepting the answers scoring at least t gives a coverage (the share answered) and a selective
risk (the share of the answered ones that are not acceptable). `risk_coverage` lists both for every threshold, best
scores first; AURC is the mean risk over coverages (Geifman & El-Yaniv 2017: lower is better; a perfect score
ranks every bad answer last). `threshold_for_risk` reads a table fitted on a calibration split: the lowest
threshold whose risk is at most the asked one, so coverage is as large as the calibration data allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def risk_coverage(scores: Sequence[float], acceptable: Sequence[bool]) -> list[dict[str, float]]:
    """`{"threshold", "coverage", "risk"}` for accepting the top k answers, k = 1..n (ties kept together)."""
    if len(scores) != len(acceptable) or not scores:
        raise ValueError(f"need as many scores as outcomes, at least one; got {len(scores)} and {len(acceptable)}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    table, bad = [], 0
    for rank, index in enumerate(order, start=1):
        bad += not acceptable[index]
        if rank < len(order) and scores[order[rank]] == scores[index]:
            continue  # a threshold accepts every answer with the same score
        table.append({"threshold": float(scores[index]), "coverage": rank / len(order), "risk": bad / rank})
    return table


def aurc(scores: Sequence[float], acceptable: Sequence[bool]) -> float:
    """Area under the risk–coverage curve: the mean, over k = 1..n, of the risk of the top k answers."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    bad, total = 0, 0.0
    for rank, index in enumerate(order, start=1):
        bad += not acceptable[index]
        total += bad / rank
    return total / len(order)


def threshold_for_risk(table: Sequence[dict[str, float]], max_risk: float) -> float:
    """The lowest calibrated threshold whose selective risk is at most `max_risk` (+inf: none is, abstain on all)."""
    if not 0 <= max_risk <= 1:
        raise ValueError(f"max_risk must be in [0, 1], got {max_risk}")
    allowed = [row["threshold"] for row in table if row["risk"] <= max_risk]
    return min(allowed) if allowed else math.inf
