"""MEND on the tiny Llama: identity at init, the rank-1 delta by hand, summed edits, meta-training, state round trip.

Note on the fixture: the tiny Llama ties its embeddings and zeroes the pad row (<|im_end|>, also the end-of-turn
label), so that token's logit is always 0 and can never be the argmax; ES here counts the other answer tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trustray.core.editing.base import batches, encode_pairs
from trustray.core.editing.editset import EditSet
from trustray.core.editing.factory import EDITORS
from trustray.core.editing.mend import MendEditor, MendNet, WelfordNormaliser
from trustray.core.editing.metrics import answer_predictions, token_accuracy
from trustray.core.editing.tracing import KeyValueTracer, edit_positions, linear_modules

torch.set_num_threads(1)

TOP = "model.layers.1.mlp.down_proj"
SUBJECTS = ["France", "Italy", "Apple", "Microsoft", "Einstein", "Everest", "Paris", "Rome"]
ANSWERS = ["Rome", "Paris", "Redmond", "Cupertino", "iron", "ocean", "water", "light"]
PLACES = ["the sea", "a hill", "Seine", "Earth"]


def make_records(n: int) -> list[dict]:
    return [
        {
            "prompt": f"What is {subject} known for?",
            "target_new": ANSWERS[i],
            "paraphrases": [f"Tell me about {subject}.", f"{subject} is known for what?"],
            "locality": [{"prompt": f"Where is {SUBJECTS[(i + 3) % 8]}?", "answer": PLACES[i % 4]}],
        }
        for i, subject in enumerate(SUBJECTS[:n])
    ]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Parameters keep requires_grad=True on purpose: the editor must leave their .grad untouched anyway.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def settings(**extra) -> dict:
    return {"modules": {"layers": [-1]}, "rank": 8, **extra}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def unchanged(model, before) -> bool:
    after = model.state_dict()
    return all(torch.equal(before[key], after[key]) for key in before) and all(
        p.grad is None for p in model.parameters()
    )


def edit_success(model, tokenizer, records) -> float:
    """Teacher-forced ES over the answer tokens other than the (never predictable) end-of-turn token."""
    prompts, answers = [r["prompt"] for r in records], [r["target_new"] for r in records]
    batch = batches(encode_pairs(tokenizer, prompts, answers), 16, "cpu")[0]
    predictions, targets, mask = answer_predictions(model, batch)
    return float(token_accuracy(predictions, targets, mask & (targets != tokenizer.eos_token_id)).mean())


def test_registered():
    assert EDITORS["mend"] is MendEditor and MendEditor.meta_learned


def test_welford_matches_batch_statistics():
    rows = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    normaliser = WelfordNormaliser(6)
    for chunk in rows.split([1, 7, 20, 22]):
        normaliser.update(chunk)
    mean, std = normaliser.stats()
    torch.testing.assert_close(mean.float(), rows.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.float(), rows.std(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="at least 2"):
        WelfordNormaliser(6)(rows[:1])


def test_editor_network_is_identity_at_init():
    generator = torch.Generator().manual_seed(1)
    net = MendNet(in_features=12, out_features=5, rank=4, n_hidden=1, n_modes=2)
    u, delta = torch.randn(30, 12, generator=generator) * 2, torch.randn(30, 5, generator=generator) + 3
    x = torch.cat([u, delta], dim=-1)
    net.normaliser.update(x)
    expected = (x - x.mean(0)) / (x.std(0) + 1e-7)
    for mode in (0, 1):
        pseudo_u, pseudo_delta = net(u, delta, mode)
        torch.testing.assert_close(pseudo_u, expected[:, :12], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pseudo_delta, expected[:, 12:], rtol=1e-5, atol=1e-5)
    assert len(net.layers) == 2 and all(float(layer.u.detach().abs().max()) == 0 for layer in net.layers)


def test_single_record_delta_by_hand(loaded):
    """ΔW = −α · δ̂ᵀ û with û, δ̂ the normalised tracer rows of the answer NLL (the identity network at init)."""
    model, tokenizer = loaded
    record = make_records(1)
    before = snapshot(model)
    editor = MendEditor(model, tokenizer, settings(edit_lr_init=3e-3))
    delta = editor.compute_deltas(record)[TOP]
    assert unchanged(model, before)
    assert set(editor.compute_deltas(record)) == {TOP} and delta.shape == model.get_submodule(TOP).weight.shape

    batch = batches(encode_pairs(tokenizer, [record[0]["prompt"]], [record[0]["target_new"]]), 1, "cpu")[0]
    with KeyValueTracer(linear_modules(model, [TOP]), edit_positions(batch["labels"])) as tracer:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)  # the record's mean NLL
        nll.backward()
    model.zero_grad(set_to_none=True)
    u, g = tracer.keys[TOP], tracer.grads[TOP]
    assert u.shape[0] == int((batch["labels"] != -100).sum()) >= 2
    x = torch.cat([u, g], dim=-1)
    normalised = (x - x.mean(0)) / (x.std(0) + 1e-7)
    u_hat, g_hat = normalised[:, : u.shape[1]], normalised[:, u.shape[1] :]
    expected = -3e-3 * g_hat.T @ u_hat
    assert float((delta - expected).norm() / expected.norm()) < 1e-4
    # The sign: without normalisation this is a step down the gradient; here it must at least lower the edit loss.
    with EditSet({TOP: delta}).apply(model), torch.no_grad():
        after = F.cross_entropy(model(input_ids=batch["input_ids"]).logits[0, :-1], batch["labels"][0, 1:])
    assert float(after) < float(nll.detach())


def test_deltas_of_several_records_are_summed(loaded):
    """With fixed statistics, the delta of two records is the sum of their single-record deltas, in any batching."""
    model, tokenizer = loaded
    records = make_records(4)
    editor = MendEditor(model, tokenizer, settings(batch_size=2))
    editor.update_normalisers(records)
    together = editor.compute_deltas(records[:2])[TOP]
    apart = editor.compute_deltas(records[:1])[TOP] + editor.compute_deltas(records[1:2])[TOP]
    assert float((together - apart).norm() / apart.norm()) < 1e-4
    editor.settings.batch_size = 1
    traced = []
    original = editor.edit_pairs
    editor.edit_pairs = lambda part: traced.append(len(part)) or original(part)
    one_by_one = editor.compute_deltas(records[:2])[TOP]
    assert traced == [1, 1]  # streamed: one sub-batch of records at a time, never all rows at once
    assert float((one_by_one - together).norm() / together.norm()) < 1e-4
    pairs = original(records)
    with torch.no_grad():  # as an inference caller would: compute_deltas enables gradients itself
        whole = editor.deltas_from_pairs(pairs)[TOP]
        streamed = editor.compute_deltas(records)[TOP]
    assert float((streamed - whole).norm() / whole.norm()) < 1e-4


def test_meta_training_raises_edit_success(loaded):
    model, tokenizer = loaded
    records = make_records(8)
    before = snapshot(model)
    editor = MendEditor(model, tokenizer, settings(edit_lr_init=1e-3, meta_lr=1e-4, lr_lr=1e-3))
    with EditSet(editor.compute_deltas(records)).apply(model):
        start = edit_success(model, tokenizer, records)
    history = [editor.meta_step(records) for _ in range(30)]
    assert unchanged(model, before)
    assert all(key in history[0] for key in ("loss", "edit_loss", "loc_loss", "es", "gs", "ls", "grad_norm"))
    with EditSet(editor.compute_deltas(records)).apply(model):
        end = edit_success(model, tokenizer, records)
    assert end >= start + 0.2, (start, end)
    assert history[-1]["edit_loss"] < history[0]["edit_loss"]
    assert float(editor.nets["64x128"].normaliser.count) > 0 and editor.steps == 30


def test_state_dict_round_trip_resumes_identically(loaded):
    model, tokenizer = loaded
    records = make_records(4)
    editor = MendEditor(model, tokenizer, settings(meta_lr=1e-3, lr_lr=1e-3))
    for _ in range(3):
        editor.meta_step(records)
    state = editor.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert any(key.startswith("optimizer.") for key in state) and "edit_lrs" in state

    restored = MendEditor(model, tokenizer, settings(meta_lr=1e-3, lr_lr=1e-3, seed=5))
    restored.load_state_dict(state)
    assert restored.steps == 3
    torch.testing.assert_close(restored.compute_deltas(records)[TOP], editor.compute_deltas(records)[TOP])
    first, second = editor.meta_step(records), restored.meta_step(records)
    assert first == pytest.approx(second, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(restored.compute_deltas(records)[TOP], editor.compute_deltas(records)[TOP])

    with pytest.raises(ValueError, match="unexpected keys"):
        restored.load_state_dict({**state, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit"):
        MendEditor(model, tokenizer, settings(rank=4)).load_state_dict(state)
