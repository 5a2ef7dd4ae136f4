"""Edit metrics on a tiny Llama: hand-checked accuracy, self-agreement, perplexity, generation hits."""

from __future__ import annotations

import math

import pytest
import torch

from trustray.core.editing.base import encode_pairs
from trustray.core.editing.evaluation import (
    ProbeSet,
    answer_examples,
    generation_scores,
    locality_reference,
    perplexity,
    prefix_cache,
    probe_reference,
    probe_scores,
    teacher_forced_scores,
)
from trustray.core.editing.metrics import agreement, exact_match, token_accuracy

torch.set_num_threads(1)
RECORDS = [
    {"prompt": f"What is the colour of thing {i}?", "target_new": colour,
     "paraphrases": [f"Thing {i} has which colour?", f"Colour of thing {i}?"],
     "locality": [{"prompt": f"Where is city {i}?", "answer": "north"}]}
    for i, colour in enumerate(["blue", "red", "green"])
]
PROBES = ProbeSet.from_rows([
    {"prompt": "Who wrote the old song?", "answer": "Anna Berg", "source": "fanoutqa"},
    {"prompt": "How tall is the tower?", "answer": "300 metres", "source": "fanoutqa"},
    {"prompt": "About Lake Ohrid, fill in the blank: it was listed in ____.", "answer": "1979", "source": "cloze"},
])


def gold_rows(tokenizer, prompts, answers) -> list[torch.Tensor]:
    """Per pair, its gold next tokens where labelled and -1 elsewhere: the predictions of a model that knows every
    answer."""
    rows = []
    for example in answer_examples(tokenizer, prompts, answers, 128):
        labels = torch.tensor(example["labels"][1:])
        rows.append(torch.where(labels == -100, torch.full_like(labels, -1), labels))
    return rows


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_llama_dir))


def test_token_metrics_by_hand():
    predictions = torch.tensor([[1, 2, 3], [4, 5, 6]])
    targets = torch.tensor([[1, 9, 3], [4, 5, 6]])
    mask = torch.tensor([[False, True, True], [True, True, False]])
    assert token_accuracy(predictions, targets, mask).tolist() == [0.5, 1.0]
    assert exact_match(predictions, targets, mask).tolist() == [0.0, 1.0]
    assert agreement(predictions, torch.tensor([[1, 2, 0], [4, 0, 6]]), mask).tolist() == [0.5, 0.5]


def test_teacher_forced_scores_match_a_direct_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    reference = locality_reference(model, tokenizer, RECORDS)
    scores = teacher_forced_scores(model, tokenizer, RECORDS, reference)
    assert scores["ls"] == 1.0  # the unedited model agrees with itself
    expected = []
    for record in RECORDS:
        example = encode_pairs(tokenizer, [record["prompt"]], [record["target_new"]])[0]
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
        with torch.no_grad():
            argmax = model(input_ids=ids).logits[0, :-1].argmax(-1)
        keep = (labels[1:] != -100) & ~torch.isin(labels[1:], torch.tensor(tokenizer.all_special_ids))
        assert 0 < keep.sum() < (labels[1:] != -100).sum()  # the end-of-turn token is labelled but not scored
        expected.append(float((argmax[keep] == labels[1:][keep]).float().mean()))
    assert scores["es"] == pytest.approx(sum(expected) / len(expected))
    assert 0 <= scores["gs"] <= 1 and 0 <= scores["ls_gold"] <= 1 and scores["es_exact"] <= scores["es"] + 1e-9


def test_scores_on_a_cached_prefix_equal_the_full_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cache = prefix_cache(model, tokenizer, RECORDS, layers=1)
    edited = [{**record, "target_new": "yellow"} for record in RECORDS]  # same prompts, other answers: other pairs
    full_reference = locality_reference(model, tokenizer, RECORDS[:2])
    cached_reference = locality_reference(model, tokenizer, RECORDS[:2], prefix=cache)
    assert all(torch.equal(a, b) for a, b in zip(full_reference, cached_reference, strict=True))
    weight = model.model.layers[1].mlp.down_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))  # an "edit" above the cache
    try:
        full = teacher_forced_scores(model, tokenizer, RECORDS[:2], full_reference)
        cached = teacher_forced_scores(model, tokenizer, RECORDS[:2], cached_reference, prefix=cache)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert cached == full and full["ls"] < 1.0  # the edit moved some locality predictions
    with pytest.raises(ValueError, match="reference"):
        teacher_forced_scores(model, tokenizer, edited, full_reference)


def test_perplexity_equals_the_exponentiated_mean_token_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = "The tower stands in the old city near the river."
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, tokenizer, [text]) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    with pytest.raises(ValueError, match="no text"):
        perplexity(model, tokenizer, [""])


def test_generation_scores_count_answers_that_contain_the_new_target():
    def generate(prompts: list[str]) -> list[str]:
        return ["It is Blue." if "thing 0" in p else "no idea" for p in prompts]

    scores = generation_scores(generate, RECORDS)
    assert scores["es_generate"] == pytest.approx(1 / 3)
    assert scores["gs_generate"] == 0.0  # "Thing 0 has which colour?" does not contain "thing 0"


def test_ls_known_counts_only_the_tokens_the_unedited_model_predicted(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    locality = [item for record in RECORDS for item in record["locality"]]
    # A reference that knew every gold token: ls_known is then plain gold accuracy.
    knowing = gold_rows(tokenizer, [i["prompt"] for i in locality], [i["answer"] for i in locality])
    scores = teacher_forced_scores(model, tokenizer, RECORDS, knowing)
    assert scores["ls_known"] == pytest.approx(scores["ls_gold"]) and scores["ls_known_records"] == len(RECORDS)
    # The model's own reference: every token it got right it still gets right.
    own = teacher_forced_scores(model, tokenizer, RECORDS, locality_reference(model, tokenizer, RECORDS))
    assert own.get("ls_known", 1.0) == 1.0


def test_probe_scores_before_after_agreement_and_known_facts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    reference = probe_reference(model, tokenizer, PROBES)
    same = probe_scores(model, tokenizer, PROBES, reference)
    assert same["agreement"] == 1.0 and same["drawdown"] == 0.0 and same["gold"] == same["gold_before"]
    assert same["n"] == 3 and {k: v["n"] for k, v in same["by_source"].items()} == {"fanoutqa": 2, "cloze": 1}
    # Pretend the unedited model knew every answer: gold_before is 1, all are known, and the kept fraction is the
    # fraction this model answers exactly, computed here token by token.
    knowing = gold_rows(tokenizer, PROBES.prompts, PROBES.answers)
    scores = probe_scores(model, tokenizer, PROBES, knowing)
    exact = []
    for example in PROBES.examples(tokenizer):
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"][1:])
        with torch.no_grad():
            argmax = model(input_ids=ids).logits[0, :-1].argmax(-1)
        exact.append(bool((argmax[labels != -100] == labels[labels != -100]).all()))
    assert scores["gold_before"] == 1.0 and scores["known"] == 3
    assert scores["known_kept"] == pytest.approx(sum(exact) / 3)
    # Every gold token was known: the kept share is this model's pooled token accuracy, counted here.
    right = total = 0
    for example in PROBES.examples(tokenizer):
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"][1:])
        with torch.no_grad():
            argmax = model(input_ids=ids).logits[0, :-1].argmax(-1)
        right += int((argmax[labels != -100] == labels[labels != -100]).sum())
        total += int((labels != -100).sum())
    assert scores["known_tokens"] == total and scores["known_tokens_kept"] == pytest.approx(right / total)
    assert same["known_tokens_kept"] in (None, 1.0)  # the unedited model keeps every token it knew
    assert scores["drawdown"] == pytest.approx(1.0 - scores["gold"])
    with pytest.raises(ValueError, match="reference"):
        probe_scores(model, tokenizer, PROBES, reference[:2])


def test_probe_scores_on_a_cached_prefix_equal_the_full_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cache = prefix_cache(model, tokenizer, RECORDS, layers=1, probes=PROBES)
    reference = probe_reference(model, tokenizer, PROBES)
    assert all(torch.equal(a, b) for a, b in
               zip(reference, probe_reference(model, tokenizer, PROBES, prefix=cache), strict=True))
    weight = model.model.layers[1].mlp.down_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    try:
        full = probe_scores(model, tokenizer, PROBES, reference)
        cached = probe_scores(model, tokenizer, PROBES, reference, prefix=cache)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert cached == full and full["agreement"] < 1.0
