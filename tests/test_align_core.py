"""The align core on synthetic data with known answers: the reward ensemble recovers a Bradley–Terry reward and
disagrees less the more it has seen, temperature scaling recovers a known temperature, calibration metrics match
hand-computed values, Mahalanobis scores separate shifted data, and each acquisition function picks what it
says it picks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trustray.core.align.acquisition import ACQUISITIONS, CandidatePool, acquire, get_acquisition
from trustray.core.align.calibration import (
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability,
    scaled_probabilities,
)
from trustray.core.align.reward import RewardEnsemble
from trustray.core.align.uncertainty import MahalanobisOOD, auroc, implicit_reward_margin, predictive_entropy

DIM = 8


def preference_pairs(count: int, seed: int, temperature: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Random feature pairs labelled by a Bradley–Terry oracle with a known linear reward."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    a = torch.randn(count, DIM, generator=generator, dtype=torch.float64)
    b = torch.randn(count, DIM, generator=generator, dtype=torch.float64)
    a_wins = torch.rand(count, generator=generator, dtype=torch.float64) < torch.sigmoid((a - b) @ truth / temperature)
    chosen = torch.where(a_wins[:, None], a, b)
    rejected = torch.where(a_wins[:, None], b, a)
    return chosen, rejected, truth


def test_the_ensemble_recovers_a_bradley_terry_reward():
    chosen, rejected, truth = preference_pairs(2000, seed=0)
    model = RewardEnsemble(heads=5, seed=0).fit(chosen, rejected)
    test_a, test_b, _ = preference_pairs(1000, seed=1)
    predicted = model.compare(test_a, test_b)
    true_order = ((test_a - test_b) @ truth) > 0
    assert float(((predicted.probability > 0.5) == true_order).double().mean()) > 0.95
    features = torch.randn(500, DIM, dtype=torch.float64)
    correlation = torch.corrcoef(torch.stack([model.rewards(features), features @ truth]))[0, 1]
    assert float(correlation) > 0.98
    assert not torch.equal(model.weights[0], model.weights[1])  # bootstrap resamples differ


def test_the_heads_disagree_less_the_more_pairs_they_have_seen():
    test_a, test_b, _ = preference_pairs(500, seed=2)
    variances = []
    for count in (20, 2000):
        chosen, rejected, _ = preference_pairs(count, seed=3)
        variances.append(float(RewardEnsemble(heads=8, seed=0).fit(chosen, rejected).compare(test_a, test_b)
                               .variance.mean()))
    assert variances[0] > 5 * variances[1]


def test_the_ensemble_refuses_bad_input_and_round_trips():
    model = RewardEnsemble(heads=2)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.rewards(torch.zeros(1, DIM))
    with pytest.raises(ValueError, match="matching"):
        model.fit(torch.zeros(3, DIM), torch.zeros(2, DIM))
    chosen, rejected, _ = preference_pairs(50, seed=4)
    model.fit(chosen, rejected)
    with pytest.raises(ValueError, match=f"\\[n, {DIM}\\]"):
        model.rewards(torch.zeros(2, DIM + 1))
    copy = RewardEnsemble().load_state_dict(model.state_dict())
    assert torch.equal(copy.rewards(chosen), model.rewards(chosen)) and copy.heads == 2
    with pytest.raises(ValueError):
        RewardEnsemble(heads=0)


def test_temperature_scaling_recovers_a_known_temperature_and_fixes_calibration():
    generator = torch.Generator().manual_seed(0)
    gaps = torch.randn(20000, generator=generator, dtype=torch.float64) * 4
    outcomes = (torch.rand(20000, generator=generator, dtype=torch.float64) < torch.sigmoid(gaps / 2.5)).double()
    overconfident = scaled_probabilities(gaps, 1.0)
    assert expected_calibration_error(overconfident, outcomes) > 0.05
    temperature = fit_temperature(gaps, outcomes)
    assert temperature == pytest.approx(2.5, rel=0.08)
    scaled = scaled_probabilities(gaps, temperature)
    assert expected_calibration_error(scaled, outcomes) < 0.02
    assert negative_log_likelihood(scaled, outcomes) < negative_log_likelihood(overconfident, outcomes)


def test_calibration_metrics_by_hand():
    p = torch.tensor([0.9, 0.2, 0.6, 0.6])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert brier_score(p, y) == pytest.approx((0.01 + 0.04 + 0.36 + 0.16) / 4)
    assert negative_log_likelihood(p, y) == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)
                                                            + math.log(0.6)) / 4)
    table = reliability(p, y, bins=10)
    assert sum(row["count"] for row in table) == 4
    # confidences 0.9, 0.8, 0.6, 0.6 with correctness 1, 1, 0, 1: bins 0.6 (acc 0.5), 0.8 (1.0), 0.9 (1.0)
    assert expected_calibration_error(p, y, bins=10) == pytest.approx((2 * 0.1 + 0.2 + 0.1) / 4)
    with pytest.raises(ValueError, match="0 or 1"):
        brier_score(p, torch.tensor([2.0, 0, 0, 1]))


def test_mahalanobis_separates_shifted_data_and_the_relative_variant_subtracts_the_background():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(400, DIM, generator=generator)
    held_in = torch.randn(200, DIM, generator=generator)
    shifted = torch.randn(200, DIM, generator=generator) + 1.5
    detector = MahalanobisOOD(train)
    scores = detector.score(torch.cat([held_in, shifted]))
    assert auroc(scores, torch.cat([torch.zeros(200), torch.ones(200)])) > 0.95
    background = torch.randn(400, DIM, generator=generator) * 3
    relative = MahalanobisOOD(train, relative_to=background)
    assert torch.allclose(relative.score(shifted), relative.task.distance(shifted) - relative.background.distance(shifted))


def test_auroc_and_the_implicit_margin():
    assert auroc(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([1, 1, 0])) == 1.0
    assert auroc(torch.tensor([0.1, 0.8, 0.9]), torch.tensor([1, 0, 0])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5
    margin = implicit_reward_margin(torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([-5.0]),
                                    torch.tensor([-4.5]), beta=0.1)
    assert float(margin) == pytest.approx(0.1 * (1.0 - (-0.5)))
    with pytest.raises(ValueError, match="beta"):
        implicit_reward_margin(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0)


def test_predictive_entropy_estimates_the_entropy_of_a_known_distribution():
    """Samples of one token from a categorical distribution: the estimate converges to its entropy."""
    probabilities = torch.tensor([0.5, 0.25, 0.125, 0.125])
    draws = torch.multinomial(probabilities, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    samples = [[math.log(float(probabilities[d]))] for d in draws]
    exact = float(-(probabilities * probabilities.log()).sum())
    assert predictive_entropy(samples) == pytest.approx(exact, rel=0.02)
    assert predictive_entropy([[-1.0, -3.0]], per_token=False) == 4.0
    assert predictive_entropy([[-1.0, -3.0]]) == 2.0
    with pytest.raises(ValueError, match="at least one"):
        predictive_entropy([[]])


POOL = CandidatePool(
    prompt_index=np.array([0, 0, 1, 1, 2, 2]),
    statistics={"policy_entropy": np.array([3.0, 3.0, 1.0, 1.0, 2.0, 2.0]),
                "implicit_margin": np.array([0.1, -2.0, 0.5, 0.05, -0.3, 1.0]),
                "ensemble_variance": np.array([0.0, 0.1, 0.3, 0.2, 0.0, 0.05]),
                "ood_score": np.array([5.0, 1.0, 0.0, 2.0, 9.0, 3.0])},
)


def test_every_acquisition_is_registered_and_picks_what_it_says():
    get_acquisition("random")
    assert set(ACQUISITIONS) == {"random", "entropy", "certainty", "uncertainty", "hybrid", "ensemble", "ood"}
    assert acquire("certainty", POOL, 2) == [1, 5]
    assert acquire("uncertainty", POOL, 2) == [3, 0]
    assert acquire("ensemble", POOL, 2) == [2, 3]
    assert acquire("ood", POOL, 2) == [4, 0]
    # entropy: one pair of each prompt, most uncertain prompt first, before any prompt's second pair
    assert [int(POOL.prompt_index[i]) for i in acquire("entropy", POOL, 4)] == [0, 2, 1, 0]
    # hybrid: the most certain pair among the 2 × budget highest-entropy prompts, not the most certain overall
    ranked = CandidatePool(np.arange(4), {"policy_entropy": np.array([4.0, 3.0, 2.0, 1.0]),
                                          "implicit_margin": np.array([0.1, 2.0, 5.0, 0.2])})
    assert acquire("hybrid", ranked, 1) == [1]
    assert acquire("certainty", ranked, 1) == [2]
    picked = acquire("random", POOL, 4, seed=3)
    assert picked == acquire("random", POOL, 4, seed=3) and len(set(picked)) == 4
    assert sorted(acquire("random", POOL, 100)) == list(range(6))


def test_acquisition_errors_are_clear():
    with pytest.raises(ValueError, match="unknown acquisition"):
        acquire("bald", POOL, 1)
    with pytest.raises(KeyError, match="implicit_margin"):
        acquire("certainty", CandidatePool(np.array([0, 1])), 1)
    with pytest.raises(ValueError, match="shape"):
        CandidatePool(np.array([0, 1]), {"ood_score": np.array([1.0])})
    with pytest.raises(ValueError, match="non-finite"):
        CandidatePool(np.array([0]), {"ood_score": np.array([np.nan])})


def test_response_features_are_the_last_tokens_final_state_whatever_the_batch(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trustray.core.align.features import response_features

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [[{"role": "user", "content": "Where is the tower?"}], [{"role": "user", "content": "Hi"}]]
    responses = ["In the old town, next to the river.", "Hello"]
    together = response_features(model, tokenizer, prompts, responses, batch_size=2)
    alone = torch.cat([response_features(model, tokenizer, [p], [r]) for p, r in zip(prompts, responses, strict=True)])
    assert together.shape == (2, model.config.hidden_size)
    assert torch.allclose(together, alone, atol=1e-5)
    with torch.no_grad():
        ids = tokenizer.apply_chat_template([*prompts[1], {"role": "assistant", "content": "Hello"}],
                                            tokenize=False)
        ids = tokenizer(ids.rstrip(), add_special_tokens=False, return_tensors="pt")
        expected = model.model(**ids).last_hidden_state[0, -1]
    assert torch.allclose(alone[1], expected, atol=1e-5)
    mean = response_features(model, tokenizer, prompts, responses, batch_size=2, pooling="mean")
    alone_mean = torch.cat([response_features(model, tokenizer, [p], [r], pooling="mean")
                            for p, r in zip(prompts, responses, strict=True)])
    assert torch.allclose(mean, alone_mean, atol=1e-5) and not torch.allclose(mean, together, atol=1e-3)
    with pytest.raises(ValueError, match="pooling"):
        response_features(model, tokenizer, prompts, responses, pooling="max")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        response_features(model, tokenizer, prompts, responses[:1])


def test_risk_coverage_aurc_and_calibrated_thresholds():
    import math

    from trustray.core.align.selective import aurc, risk_coverage, threshold_for_risk

    scores = [0.9, 0.8, 0.8, 0.3, 0.1]
    acceptable = [True, True, False, True, False]
    table = risk_coverage(scores, acceptable)
    assert [(row["threshold"], row["coverage"], round(row["risk"], 4)) for row in table] == [
        (0.9, 0.2, 0.0), (0.8, 0.6, round(1 / 3, 4)), (0.3, 0.8, 0.25), (0.1, 1.0, 0.4)]
    assert threshold_for_risk(table, 0.25) == 0.3 and threshold_for_risk(table, 0.0) == 0.9
    assert threshold_for_risk(risk_coverage([0.5], [False]), 0.1) == math.inf
    # A perfect ranking has the smallest AURC; the reversed one the largest.
    assert aurc([3, 2, 1], [True, True, False]) < aurc([1, 2, 3], [True, True, False])
    assert aurc([0.9, 0.8, 0.7, 0.3, 0.1], acceptable) == pytest.approx((0 + 0 + 1 / 3 + 1 / 4 + 2 / 5) / 5)
