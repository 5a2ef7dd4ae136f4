"""Fine-tuning baselines on the tiny Llama: the model is never changed, edits land, the norm bound holds,
the locality/replay terms keep unrelated predictions closer to the unedited model.

The tiny Llama zeroes the tied embedding row of <|im_end|> (its pad token, also the end-of-turn label), so that
token can never be the argmax; ES here counts the other answer tokens.
"""

from __future__ import annotations

import pytest
import torch

from trustray.core.editing.base import batches, encode_pairs
from trustray.core.editing.editset import EditSet
from trustray.core.editing.factory import EDITORS
from trustray.core.editing.finetune import (
    FineTuneEditor,
    FineTuneKLEditor,
    answer_kl,
    forward_logits,
    locality_examples,
    row_nll,
)
from trustray.core.editing.metrics import agreement, answer_predictions, token_accuracy

torch.set_num_threads(1)

TOP = "model.layers.1.mlp.down_proj"
SUBJECTS = ["France", "Italy", "Apple", "Microsoft", "Einstein", "Everest", "Paris", "Rome"]
ANSWERS = ["Rome", "Paris", "Redmond", "Cupertino"]
PLACES = ["the sea", "a hill", "Seine", "Earth"]
FT = {"modules": {"layers": [-1]}, "steps": 30, "lr": 3e-2, "norm_bound": 3.0, "early_stop_loss": 0.0}


def make_records(n: int = 4) -> list[dict]:
    return [
        {
            "prompt": f"What is {subject} known for?",
            "target_new": ANSWERS[i],
            "paraphrases": [f"Tell me about {subject}."],
            "locality": [{"prompt": f"Where is {SUBJECTS[i + 4]}?", "answer": PLACES[i]}],
        }
        for i, subject in enumerate(SUBJECTS[:n])
    ]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def edit_success(model, tokenizer, records) -> float:
    prompts, answers = [r["prompt"] for r in records], [r["target_new"] for r in records]
    batch = batches(encode_pairs(tokenizer, prompts, answers), 16, "cpu")[0]
    predictions, targets, mask = answer_predictions(model, batch)
    return float(token_accuracy(predictions, targets, mask & (targets != tokenizer.eos_token_id)).mean())


def locality_drift(model, tokenizer, records, deltas) -> tuple[float, float]:
    """(mean KL(pre ‖ post), argmax agreement) at the locality answer positions."""
    batch = batches(locality_examples(tokenizer, records, 128), 16, "cpu")[0]
    with torch.no_grad():
        reference = forward_logits(model, batch)
        with EditSet(deltas).apply(model):
            edited = forward_logits(model, batch)
    total, count = answer_kl(reference, edited, batch["labels"])
    mask = batch["labels"][:, 1:] != -100
    agree = agreement(edited[:, :-1].argmax(-1), reference[:, :-1].argmax(-1), mask)
    return float(total) / count, float(agree.mean())


def test_registered():
    assert EDITORS["ft"] is FineTuneEditor and EDITORS["ft_kl"] is FineTuneKLEditor
    assert not FineTuneEditor.meta_learned


def test_row_nll_is_each_rows_mean():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    expected = [
        torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:4]),
        torch.nn.functional.cross_entropy(logits[1, 0:4], labels[1, 1:5]),
    ]
    torch.testing.assert_close(row_nll(logits, labels), torch.stack(expected))


def test_ft_edits_without_changing_the_model(loaded):
    model, tokenizer = loaded
    records = make_records()
    before = snapshot(model)
    assert edit_success(model, tokenizer, records) < 0.2
    editor = FineTuneEditor(model, tokenizer, FT)
    deltas = editor.compute_deltas(records)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(p.grad is None for p in model.parameters())
    assert set(deltas) == {TOP} and deltas[TOP].shape == model.get_submodule(TOP).weight.shape

    bound = 3.0 * float(torch.linalg.matrix_norm(model.get_submodule(TOP).weight.detach()))
    assert editor.bounds()[TOP] == pytest.approx(bound)
    assert float(torch.linalg.matrix_norm(deltas[TOP])) <= bound * (1 + 1e-5)
    with EditSet(deltas).apply(model):
        assert edit_success(model, tokenizer, records) >= 0.9
    assert editor.last_history[-1]["edit_loss"] < editor.last_history[0]["edit_loss"]


def test_absolute_bound_and_early_stop(loaded):
    model, tokenizer = loaded
    settings = {**FT, "norm_bound": 0.5, "norm_relative": False, "steps": 5}
    deltas = FineTuneEditor(model, tokenizer, settings).compute_deltas(make_records(2))
    assert float(torch.linalg.matrix_norm(deltas[TOP])) <= 0.5 * (1 + 1e-5)
    editor = FineTuneEditor(model, tokenizer, {**FT, "early_stop_loss": 100.0})
    editor.compute_deltas(make_records(2))
    assert len(editor.last_history) == 1


def test_ft_kl_stays_closer_to_the_unedited_model(loaded):
    model, tokenizer = loaded
    records = make_records()
    plain = FineTuneEditor(model, tokenizer, FT).compute_deltas(records)
    kl_editor = FineTuneKLEditor(model, tokenizer, {**FT, "loc_coef": 10.0})
    anchored = kl_editor.compute_deltas(records)
    kl_plain, agree_plain = locality_drift(model, tokenizer, records, plain)
    kl_anchored, agree_anchored = locality_drift(model, tokenizer, records, anchored)
    assert kl_anchored < 0.5 * kl_plain, (kl_anchored, kl_plain)
    assert agree_anchored >= agree_plain
    assert "loc_kl" in kl_editor.last_history[-1] and not any(k.startswith("replay") for k in kl_editor.last_history[-1])
    with EditSet(anchored).apply(model):
        assert edit_success(model, tokenizer, records) >= 0.9


def test_ft_kl_replay_on_general_text(loaded):
    model, tokenizer = loaded
    records = make_records(2)
    texts = ["The Pacific Ocean is the largest ocean on Earth.", "Water boils at 100 degrees Celsius."]
    settings = {**FT, "steps": 3, "general_text": texts, "replay_batch_size": 1}
    editor = FineTuneKLEditor(model, tokenizer, settings)
    editor.compute_deltas(records)
    assert editor.last_history[-1]["replay_kl"] >= 0
    seen: list[int] = []

    def sampler(step: int) -> list[str]:
        seen.append(step)
        return texts[step % 2 :][:1]

    nll_editor = FineTuneKLEditor(model, tokenizer, {**settings, "replay_loss": "nll"}, general_text=sampler)
    nll_editor.compute_deltas(records)
    assert seen == [0, 1, 2] and nll_editor.last_history[-1]["replay_nll"] > 0


def test_ft_kl_on_a_cached_prefix_equals_the_full_model(loaded):
    model, tokenizer = loaded
    records = make_records(3)
    settings = {**FT, "steps": 3, "loc_coef": 1.0, "general_text": ["The Pacific Ocean is the largest ocean."]}
    full = FineTuneKLEditor(model, tokenizer, settings).compute_deltas(records)
    cached = FineTuneKLEditor(model, tokenizer, {**settings, "prefix_layers": 1}).compute_deltas(records)
    for name, delta in full.items():
        torch.testing.assert_close(cached[name], delta, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="prefix_layers"):
        FineTuneEditor(model, tokenizer, {**FT, "prefix_layers": 2})


def test_the_answer_window_keeps_losses_and_kl(loaded):
    model, tokenizer = loaded
    records = make_records(3)
    editor = FineTuneKLEditor(model, tokenizer, FT)
    batch = batches(locality_examples(tokenizer, records, 128) + encode_pairs(tokenizer, ["Hi?"], ["A long answer here"]),
                    8, "cpu")[0]
    logits, labels = editor._logits(batch)
    assert labels.shape[1] < batch["labels"].shape[1]  # the prompt positions were not projected
    full = forward_logits(model, batch)
    torch.testing.assert_close(row_nll(logits, labels), row_nll(full, batch["labels"]))
    shifted = full + torch.randn_like(full)
    window = shifted[:, -labels.shape[1]:]
    assert answer_kl(full[:, -labels.shape[1]:], window, labels)[1] == answer_kl(full, shifted, batch["labels"])[1]
    torch.testing.assert_close(answer_kl(full[:, -labels.shape[1]:], window, labels)[0],
                               answer_kl(full, shifted, batch["labels"])[0])
