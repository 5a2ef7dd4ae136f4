"""Weak-to-strong core: the three losses against hand values, the split, PGR and its intervals, and classifiers
whose cached-state forward equals the whole model's, that learn, and that resume exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trustray.core.w2s.classifier import (
    ClassifierTrainer,
    LastTokenClassifier,
    LinearHead,
    TrainSettings,
    layer_inputs,
)
from trustray.core.w2s.losses import build_loss, loss_names
from trustray.core.w2s.protocol import interval, performance_gap_recovered, split_halves, summarize_pgr
from trustray.models.loading import load_causal_lm


def test_registry_has_the_three_losses_and_names_unknown_ones():
    assert loss_names() == ["logconf", "product", "xent"]
    with pytest.raises(ValueError, match="available: logconf, product, xent"):
        build_loss("hinge")


def test_xent_is_cross_entropy_against_soft_labels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    expected = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert build_loss("xent")(logits, targets, 0.5).item() == pytest.approx(expected.item())


def test_logconf_mixes_in_the_students_predictions_hardened_to_the_weak_balance():
    logits = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    weak = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8], [0.3, 0.7]])  # balance: 0.4 class 0, 0.6 class 1
    loss = build_loss("logconf", aux_coef=0.5, warmup_fraction=0.2)
    # Past warm-up c = 0.5; the threshold at the weak balance hardens P(class 0) to the top 40%: rows 0 and 1.
    hard = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    target = 0.5 * weak + 0.5 * hard
    expected = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert loss(logits, weak, 0.5).item() == pytest.approx(expected.item(), abs=1e-6)
    # At the start c = 0: plain cross-entropy; halfway through warm-up c = 0.25.
    assert loss(logits, weak, 0.0).item() == pytest.approx(build_loss("xent")(logits, weak, 0.0).item())
    quarter = -((0.75 * weak + 0.25 * hard) * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert loss(logits, weak, 0.1).item() == pytest.approx(quarter.item(), abs=1e-6)


def test_logconf_hardens_by_argmax_with_more_classes():
    logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    weak = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    hard = F.one_hot(torch.tensor([1, 0]), 3).float()
    expected = -((0.5 * weak + 0.5 * hard) * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss = build_loss("logconf", aux_coef=0.5, warmup_fraction=0.0)
    assert loss(logits, weak, 0.0).item() == pytest.approx(expected.item(), abs=1e-6)


def test_product_targets_the_normalised_product_of_both_beliefs():
    logits = torch.tensor([[1.0, 0.0]])
    weak = torch.tensor([[0.4, 0.6]])
    student = torch.softmax(logits, dim=1)
    target = student * weak / (student * weak).sum()
    expected = -(target * torch.log_softmax(logits, dim=1)).sum()
    assert build_loss("product")(logits, weak, 0.3).item() == pytest.approx(expected.item(), abs=1e-6)


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="matching"):
        build_loss("xent")(torch.zeros(3, 2), torch.zeros(3, 3), 0.0)
    with pytest.raises(ValueError, match="step_fraction"):
        build_loss("xent")(torch.zeros(3, 2), torch.full((3, 2), 0.5), 1.5)


def test_split_halves_partitions_deterministically():
    first, second = split_halves(11, seed=3)
    assert sorted(first + second) == list(range(11)) and len(first) == 6 and len(second) == 5
    assert split_halves(11, seed=3) == (first, second) and split_halves(11, seed=4) != (first, second)
    labels = [0] * 8 + [1] * 4
    first, second = split_halves(12, seed=0, strata=labels)
    assert [labels[i] for i in first].count(1) == 2 and [labels[i] for i in second].count(1) == 2


def test_pgr_and_its_interval_over_seeds():
    assert performance_gap_recovered(0.6, 0.8, 0.7) == pytest.approx(0.5)
    assert math.isnan(performance_gap_recovered(0.8, 0.8, 0.9))
    summary = summarize_pgr([0.6, 0.6, 0.6], [0.8, 0.9, 0.8], [0.7, 0.75, 0.8])
    assert summary["pgr"]["mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert summary["pgr_of_means"] == pytest.approx((0.75 - 0.6) / (0.8333333 - 0.6), rel=1e-5)
    low, high = summary["pgr"]["ci95"]
    # t(0.975, 2) = 4.303; s.e. of (0.5, 0.5, 1.0) = 0.1667
    assert high - low == pytest.approx(2 * 4.3027 * 0.16667, rel=1e-3)
    assert summarize_pgr([0.8], [0.7], [0.9])["pgr"] is None
    assert interval([0.5]).standard_error is None


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    torch.manual_seed(0)
    return load_causal_lm(tiny_llama_dir, "cpu", "float32")


def test_layer_inputs_feed_a_classifier_that_equals_the_whole_model(tiny_lm):
    examples = [[5, 9, 22, 7], [3, 4], [8, 8, 8, 8, 8, 1]]
    states = layer_inputs(tiny_lm, examples, [0, 1, 2])
    depth = len(tiny_lm.model.layers)
    assert depth == 2 and [s.shape[0] for s in states[1]] == [4, 2, 6]
    with torch.no_grad():
        final = [tiny_lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1] for ids in examples]
    for trainable in (0, 1, 2):
        classifier = LastTokenClassifier(tiny_lm, num_layers=depth, trainable_layers=trainable, num_classes=3)
        torch.nn.init.normal_(classifier.head.weight)
        batch = classifier.collate(states[depth - trainable])
        with torch.no_grad():
            logits = classifier(batch)
        expected = torch.stack([classifier.head(state) for state in final])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # A truncated model: one layer, the norm applied to that layer's output.
    truncated = LastTokenClassifier(tiny_lm, num_layers=1, trainable_layers=1, num_classes=2)
    assert len(truncated.decoder.layers) == 1 and truncated.input_layer == 0
    assert torch.equal(truncated.head.weight, torch.zeros(2, tiny_lm.config.hidden_size))
    assert truncated.decoder.embed_tokens is None
    assert len(tiny_lm.model.layers) == 2 and tiny_lm.model.embed_tokens is not None  # the source is untouched


def test_classifier_learns_and_resumes_exactly(tiny_lm, tmp_path):
    torch.manual_seed(0)
    examples = [[int(t) for t in torch.randint(10, 200, (5,))] for _ in range(40)]
    labels = torch.tensor([ids[-1] % 2 for ids in examples])
    targets = F.one_hot(labels, 2).float()
    states = layer_inputs(tiny_lm, examples, [1])[1]
    settings = TrainSettings(epochs=6, batch_size=8, learning_rate=3e-3)

    def trainer() -> ClassifierTrainer:
        classifier = LastTokenClassifier(tiny_lm, num_layers=2, trainable_layers=1, num_classes=2)
        return ClassifierTrainer(classifier, states, targets, build_loss("xent"), settings, seed=1)

    whole = trainer()
    before = whole.predict(states)
    assert torch.allclose(before, torch.full_like(before, 0.5))  # the zero head starts at chance
    for step in range(1, whole.total_steps + 1):
        whole.step(step)
    accuracy = (whole.predict(states).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.9
    resumed = trainer()
    middle = whole.total_steps // 2
    for step in range(1, middle + 1):
        resumed.step(step)
    resumed.save(tmp_path)
    again = trainer()
    again.load(tmp_path)
    for step in range(middle + 1, whole.total_steps + 1):
        again.step(step)
    torch.testing.assert_close(again.predict(states), whole.predict(states))


def test_linear_head_on_pair_differences_is_an_antisymmetric_bradley_terry_model():
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(6, generator=generator)
    a, b = torch.randn(200, 6, generator=generator), torch.randn(200, 6, generator=generator)
    a_wins = (a @ direction > b @ direction).long()
    head = LinearHead(6, 2, bias=False).standardise_with(a - b, centre=False)
    trainer = ClassifierTrainer(head, list(a - b), F.one_hot(1 - a_wins, 2).float(), build_loss("xent"),
                                TrainSettings(epochs=20, batch_size=32, learning_rate=0.05))
    for step in range(1, trainer.total_steps + 1):
        trainer.step(step)
    forward, backward = trainer.predict(list(a - b)), trainer.predict(list(b - a))
    torch.testing.assert_close(forward[:, 0], backward[:, 1])
    assert ((forward[:, 0] > 0.5).long() == a_wins).float().mean() >= 0.95


def test_trainer_rejects_targets_that_are_not_probabilities():
    with pytest.raises(ValueError, match="sum to 1"):
        ClassifierTrainer(LinearHead(3, 2), [torch.zeros(3)], torch.tensor([[1.0, 1.0]]), build_loss("xent"),
                          TrainSettings())
