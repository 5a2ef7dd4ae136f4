"""Fidelity metrics: Spearman with ties, top-fraction overlap, and exact vs reduced scores on a tiny Llama."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trustray.core.influence.fidelity import average_ranks, fidelity_row, spearman, top_overlap
from trustray.core.influence.gradients import per_example_gradients
from trustray.core.influence.reductions import build_reduction
from trustray.core.influence.scoring import aggregate_targets, influence_scores

torch.set_num_threads(1)


def test_average_ranks_share_ties():
    np.testing.assert_allclose(average_ranks(np.array([10.0, 20.0, 20.0, 5.0, 20.0])), [2, 4, 4, 1, 4])


def test_spearman_matches_hand_computation_with_ties():
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]; centred: a' = [-1.5, 0, 0, 1.5], b' = [-1.5, .5, -.5, 1.5]
    # ρ = (2.25 + 2.25) / sqrt(4.5 * 5) = 4.5 / sqrt(22.5)
    a, b = np.array([1.0, 2.0, 2.0, 3.0]), np.array([0.1, 0.7, 0.5, 0.9])
    assert spearman(a, b) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman(b, a) == pytest.approx(spearman(a, b))


def test_spearman_monotone_and_reversed():
    x = np.random.default_rng(0).normal(size=50)
    assert spearman(x, np.exp(3 * x) + 7) == pytest.approx(1.0)
    assert spearman(x, -x**3) == pytest.approx(-1.0)


def test_spearman_constant_is_nan_and_lengths_checked():
    assert math.isnan(spearman(np.ones(4), np.arange(4.0)))
    with pytest.raises(ValueError, match="length"):
        spearman(np.arange(3.0), np.arange(4.0))


def test_top_overlap_edge_cases():
    x = np.arange(200.0)
    assert top_overlap(x, x, 0.05) == 1.0
    assert top_overlap(x, -x, 0.05) == 0.0
    # 1% of 200 is 2: the reference's top two are rows 199 and 198; the approx keeps only 199 of them.
    approx = x.copy()
    approx[198] = -1
    assert top_overlap(x, approx, 0.01) == 0.5
    # Fewer than 100 rows: top 1% is still one element.
    assert top_overlap(np.array([3.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0]), 0.01) == 0.0
    assert top_overlap(np.array([3.0, 1.0, 2.0]), np.array([5.0, 1.0, 2.0]), 0.01) == 1.0
    with pytest.raises(ValueError):
        top_overlap(np.zeros(0), np.zeros(0), 0.05)
    with pytest.raises(ValueError):
        top_overlap(x, x, 0.0)


def _batch(count: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 13, (count,), generator=generator)
    width = int(lengths.max())
    input_ids = torch.randint(5, 200, (count, width), generator=generator)
    attention_mask = (torch.arange(width) < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def flat_gradients(tiny_llama_dir) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(model, config).eval()
    return per_example_gradients(model, _batch(40, 0)).flat(), per_example_gradients(model, _batch(6, 1)).flat()


def _scores(train: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    return aggregate_targets(influence_scores(train.numpy(), targets.numpy()), ["a", "a", "a", "b", "b", "b"])


def test_no_reduction_has_perfect_fidelity(flat_gradients):
    train, targets = flat_gradients
    exact = _scores(train, targets)
    reduction = build_reduction("none", None).fit(train)
    row = fidelity_row(exact, _scores(reduction.transform(train), reduction.transform(targets)))
    assert row == {"spearman": 1.0, "top1_overlap": 1.0, "top5_overlap": 1.0}


def test_gaussian_near_full_dim_keeps_the_ranking(flat_gradients):
    train, targets = flat_gradients
    dim = train.shape[1]
    reduction = build_reduction("gaussian", dim - dim // 10, seed=0)
    both = reduction.transform(torch.cat([train, targets]))
    row = fidelity_row(_scores(train, targets), _scores(both[: len(train)], both[len(train) :]))
    assert row["spearman"] > 0.9
