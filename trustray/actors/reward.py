"""`RewardScorer`: a saved reward model (`trustray.core.align.reward.save_reward_model`) with the frozen backbone its
features come from, scoring responses to a prompt: reward (the ensemble's mean), the heads' disagreement (their
standard deviation), the Mahalanobis OOD score against the training responses and whether it passes the saved
threshold. The Serve reward deployment wraps it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from trustray.core.align.features import response_features
from trustray.core.align.reward import load_reward_model
from trustray.core.align.selective import threshold_for_risk
from trustray.models.loading import load_causal_lm, load_tokenizer
from trustray.models.sources import model_fingerprint


class RewardScorer:
    """See the module docstring; the base model must be the one the reward model was trained on (fingerprint)."""

    def __init__(self, model_dir: str, device: str | None = None) -> None:
        self.ensemble, self.in_distribution, self.metadata = load_reward_model(model_dir)
        source = self.metadata["base_model"]
        if model_fingerprint(source) != self.metadata["base_model_fingerprint"]:
            raise ValueError(f"the reward model in {model_dir} was trained on another version of {source}")
        self.model = load_causal_lm(source, device, "float32").eval()
        self.tokenizer = load_tokenizer(source)

    def score(self, prompt: Sequence[Mapping[str, str]], responses: Sequence[str]) -> list[dict[str, Any]]:
        features = response_features(self.model, self.tokenizer, [prompt] * len(responses), responses,
                                     max_length=self.metadata["max_length"], pooling=self.metadata["pooling"])
        heads = self.ensemble.head_rewards(features)
        ood = self.in_distribution.distance(features)
        threshold = self.metadata["ood_threshold"]
        return [{"reward": float(heads[:, i].mean()), "uncertainty": float(heads[:, i].std(unbiased=False)),
                 "ood_score": float(ood[i]), "ood": bool(ood[i] > threshold)} for i in range(len(responses))]

    def threshold(self, max_risk: float | None, threshold: float | None) -> float:
        """The reward an answer needs to be given: the one asked for, or the one calibrated for `max_risk`."""
        if threshold is not None:
            return threshold
        table = self.metadata.get("selective")
        if not table:
            raise ValueError("this reward model has no risk calibration (selective table): give a threshold")
        value = threshold_for_risk(table["table"], max_risk)
        return value if math.isfinite(value) else math.inf
