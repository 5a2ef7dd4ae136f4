"""Bradley–Terry reward models on frozen features, as an ensemble that knows when it disagrees.

A response's reward is a linear head on a fixed feature vector (the frozen chat model's final hidden states,
`trustray.core.align.features`, computed once and cached by the caller): r(x) = wᵀ(x − μ)/σ + b, with μ, σ the feature
means and scales of the training responses. The preference model is Bradley–Terry:
P(a ≻ b) = σ((r(a) − r(b)) / T), T a temperature fitted afterwards on a calibration split
(`trustray.core.align.calibration.fit_temperature`); the bias cancels in every comparison and is not learned.

`RewardEnsemble` trains K heads, each on its own bootstrap resample of the labelled pairs (drawn from `seed`;
Lakshminarayanan et al. 2017's deep ensembles, here on a linear head; the heads start from zero, so the resample
is what makes them differ), and predicts with their mean; the heads' disagreement
(variance of P(a ≻ b) across heads) is the epistemic uncertainty an acquisition function can ask about. Training is
full-batch L-BFGS on the logistic loss with an L2 penalty: deterministic for a seed, seconds for thousands of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trustray.core.align.uncertainty import GaussianFeatures


@dataclass
class PairPredictions:
    """Per pair: P(a ≻ b) by the ensemble mean, its variance across heads, and the mean reward gap r(a) − r(b)."""

    probability: Tensor
    variance: Tensor
    gap: Tensor


class RewardEnsemble:
    """K linear Bradley–Terry heads on standardised features (see the module docstring)."""

    def __init__(self, heads: int = 5, l2: float = 1e-2, bootstrap: bool = True, seed: int = 0,
                 max_iterations: int = 200) -> None:
        if heads < 1 or l2 < 0 or max_iterations < 1:
            raise ValueError(f"need heads >= 1, l2 >= 0, max_iterations >= 1; got {heads}, {l2}, {max_iterations}")
        self.heads, self.l2, self.bootstrap, self.seed = heads, l2, bootstrap, seed
        self.max_iterations = max_iterations
        self.weights: Tensor | None = None  # [K, d]
        self.mean: Tensor | None = None
        self.scale: Tensor | None = None
        self.temperature = 1.0

    def fit(self, chosen: Tensor, rejected: Tensor) -> RewardEnsemble:
        """Train every head on (chosen ≻ rejected) feature pairs, [n, d] each; resets the temperature to 1."""
        if chosen.shape != rejected.shape or chosen.dim() != 2 or len(chosen) == 0:
            raise ValueError(f"chosen and rejected must be matching non-empty [n, d] matrices; got "
                             f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
        both = torch.cat([chosen, rejected]).double()
        self.mean = both.mean(dim=0)
        self.scale = both.std(dim=0).clamp_min(1e-6) if len(both) > 1 else torch.ones_like(self.mean)
        differences = self._standardise(chosen) - self._standardise(rejected)
        generator = torch.Generator().manual_seed(self.seed)
        weights = []
        for _ in range(self.heads):
            rows = (torch.randint(len(differences), (len(differences),), generator=generator)
                    if self.bootstrap and self.heads > 1 else torch.arange(len(differences)))
            weights.append(self._fit_head(differences[rows]))
        self.weights = torch.stack(weights)
        self.temperature = 1.0
        return self

    def _fit_head(self, differences: Tensor) -> Tensor:
        weight = torch.zeros(differences.shape[1], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight], max_iter=self.max_iterations, line_search_fn="strong_wolfe")

        def loss() -> Tensor:
            optimizer.zero_grad()
            value = torch.nn.functional.softplus(-(differences @ weight)).mean() + self.l2 * weight.square().sum()
            value.backward()
            return value

        optimizer.step(loss)
        return weight.detach()

    def _standardise(self, features: Tensor) -> Tensor:
        if self.mean is None or self.scale is None:
            raise RuntimeError("the reward ensemble is not fitted yet")
        if features.dim() != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be [n, {self.mean.shape[0]}], got {tuple(features.shape)}")
        return (features.double() - self.mean) / self.scale

    def head_rewards(self, features: Tensor) -> Tensor:
        """Every head's reward of each response, [K, n] (no bias: only differences are meaningful)."""
        if self.weights is None:
            raise RuntimeError("the reward ensemble is not fitted yet")
        return self.weights @ self._standardise(features).T

    def rewards(self, features: Tensor) -> Tensor:
        """The ensemble's mean reward of each response, [n]."""
        return self.head_rewards(features).mean(dim=0)

    def compare(self, a: Tensor, b: Tensor) -> PairPredictions:
        """P(a ≻ b) per pair (the mean of the heads' probabilities at the fitted temperature), its variance across
        heads, and the mean reward gap."""
        gaps = self.head_rewards(a) - self.head_rewards(b)
        probabilities = torch.sigmoid(gaps / self.temperature)
        variance = probabilities.var(dim=0, unbiased=False)
        return PairPredictions(probabilities.mean(dim=0), variance, gaps.mean(dim=0))

    def calibrate(self, a: Tensor, b: Tensor, a_preferred: Tensor) -> float:
        """Fit the temperature on a calibration split of pairs with outcomes (1: a was preferred); returns it."""
        from trustray.core.align.calibration import fit_temperature

        self.temperature = fit_temperature(self.head_rewards(a) - self.head_rewards(b), a_preferred)
        return self.temperature

    def state_dict(self) -> dict[str, Tensor | float]:
        if self.weights is None:
            raise RuntimeError("the reward ensemble is not fitted yet")
        return {"weights": self.weights, "mean": self.mean, "scale": self.scale, "temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Tensor | float]) -> RewardEnsemble:
        self.weights, self.mean, self.scale = state["weights"], state["mean"], state["scale"]
        self.temperature = float(state["temperature"])
        self.heads = int(self.weights.shape[0])
        return self


REWARD_MODEL_KIND = "reward_model"
STATE_FILE = "reward_model.pt"


def save_reward_model(folder: str | Path, ensemble: RewardEnsemble, in_distribution: GaussianFeatures,
                      metadata: dict[str, Any]) -> Path:
    """A servable reward model: the ensemble, the Gaussian of its training features (the OOD score) and
    `metadata.json` (base model and its fingerprint, pooling, OOD threshold, selective-generation table...),
    written atomically."""
    from trustray.artifacts import atomic_folder, write_metadata

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        torch.save({"ensemble": ensemble.state_dict(), "ood": in_distribution.state_dict()}, tmp / STATE_FILE)
        write_metadata(tmp, {"kind": REWARD_MODEL_KIND, "heads": ensemble.heads,
                             "temperature": ensemble.temperature, **metadata})
    return folder


def load_reward_model(folder: str | Path) -> tuple[RewardEnsemble, GaussianFeatures, dict[str, Any]]:
    """What `save_reward_model` wrote: (ensemble, training-feature Gaussian, metadata)."""
    from trustray.artifacts import read_artifact

    metadata = read_artifact(folder, REWARD_MODEL_KIND, "reward model", ": run trustray run active_preference")
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    ensemble = RewardEnsemble(heads=metadata["heads"]).load_state_dict(state["ensemble"])
    return ensemble, GaussianFeatures.from_state(state["ood"]), metadata
