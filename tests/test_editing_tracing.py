"""Key/value-gradient tracing on the tiny Llama: alignment with the weight gradient, row counts, hook hygiene."""

from __future__ import annotations

import pytest
import torch

from trustray.core.editing.tracing import KeyValueTracer, edit_positions, linear_modules

torch.set_num_threads(1)

TOP = "model.layers.1.mlp.down_proj"  # the last block: only predicting positions get gradient here
LOW = "model.layers.0.mlp.down_proj"  # later attention also sends gradient to earlier positions


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in (TOP, LOW):
        model.get_submodule(name).weight.requires_grad_(True)
    return model


def make_batch(lengths=(9, 6, 4), prompts=(6, 3, 2), seed: int = 0, pad_id: int = 3) -> dict[str, torch.Tensor]:
    """Right-padded prompt ⊕ answer rows, labels aligned with input_ids: prompt tokens and padding are -100."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(5, 200, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    labels = input_ids.clone()
    for i, (length, prompt) in enumerate(zip(lengths, prompts, strict=True)):
        attention_mask[i, :length] = 1
        input_ids[i, length:] = pad_id
        labels[i, length:] = -100
        labels[i, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _backward(model, batch) -> None:
    model(**batch).loss.backward()


def _outer_sum(keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Σ_j g_j k_jᵀ, shaped like an nn.Linear weight [out, in]."""
    return grads.T @ keys


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_edit_positions_alignment():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [5, -100, -100, 9, 4]])
    expected = torch.tensor([[False, True, True, False, False], [False, False, True, True, False]])
    assert torch.equal(edit_positions(labels), expected)


def test_linear_modules(model):
    modules = linear_modules(model, [TOP, LOW])
    assert list(modules) == [TOP, LOW] and all(isinstance(m, torch.nn.Linear) for m in modules.values())
    with pytest.raises(KeyError, match="no module named"):
        linear_modules(model, ["model.layers.9.mlp.down_proj"])
    with pytest.raises(TypeError, match="not nn.Linear"):
        linear_modules(model, ["model.layers.1.mlp"])


def test_traced_pairs_sum_to_the_weight_gradient(model):
    """Σ_j g_j k_jᵀ over the edit positions equals down_proj.weight.grad: the mask is aligned with the loss."""
    batch = make_batch()
    modules = linear_modules(model, [TOP])
    model.zero_grad()
    with KeyValueTracer(modules, edit_positions(batch["labels"])) as tracer:
        _backward(model, batch)
    keys, grads = tracer.keys[TOP], tracer.grads[TOP]
    n_labelled = int((batch["labels"] != -100).sum())
    assert keys.shape == (n_labelled, 128) and grads.shape == (n_labelled, 64)
    assert keys.dtype == grads.dtype == torch.float32
    assert _relative(_outer_sum(keys, grads), modules[TOP].weight.grad) < 1e-5


def test_misaligned_mask_does_not_reproduce_the_gradient(model):
    """Using `labels != -100` directly (MALMEN's pre-shifted convention) selects the wrong rows here."""
    batch = make_batch()
    modules = linear_modules(model, [TOP])
    model.zero_grad()
    with KeyValueTracer(modules, batch["labels"] != -100) as tracer:
        _backward(model, batch)
    assert _relative(_outer_sum(tracer.keys[TOP], tracer.grads[TOP]), modules[TOP].weight.grad) > 0.1


def test_lower_layer_needs_all_positions(model):
    """Below the top block, prompt positions get gradient through attention: only the attention mask is complete."""
    batch = make_batch()
    modules = linear_modules(model, [LOW])
    model.zero_grad()
    with KeyValueTracer(modules, batch["attention_mask"].bool()) as tracer:
        _backward(model, batch)
    weight_grad = modules[LOW].weight.grad
    assert _relative(_outer_sum(tracer.keys[LOW], tracer.grads[LOW]), weight_grad) < 1e-5
    model.zero_grad()
    with KeyValueTracer(modules, edit_positions(batch["labels"])) as tracer:
        _backward(model, batch)
    assert _relative(_outer_sum(tracer.keys[LOW], tracer.grads[LOW]), weight_grad) > 1e-3


def test_sub_batches_concatenate(model):
    """Two sub-batches (different widths, backward in reverse order) give the rows of both, paired correctly."""
    first, second = make_batch(seed=1), make_batch(lengths=(7, 5), prompts=(4, 4), seed=2)
    modules = linear_modules(model, [TOP])
    model.zero_grad()
    with KeyValueTracer(modules, edit_positions(first["labels"])) as tracer:
        first_loss = model(**first).loss
        tracer.mask = edit_positions(second["labels"])
        second_loss = model(**second).loss
        second_loss.backward()
        first_loss.backward()
    n_labelled = int((first["labels"] != -100).sum() + (second["labels"] != -100).sum())
    keys, grads = tracer.keys[TOP], tracer.grads[TOP]
    assert keys.shape[0] == grads.shape[0] == n_labelled
    assert _relative(_outer_sum(keys, grads), modules[TOP].weight.grad) < 1e-5


def test_hooks_removed_on_exit_and_on_exception(model):
    batch = make_batch()
    modules = linear_modules(model, [TOP, LOW])
    with KeyValueTracer(modules, edit_positions(batch["labels"])) as tracer:
        loss = model(**batch).loss
    loss.backward()  # after exit: the pending tensor hooks are gone too
    assert all(not m._forward_hooks for m in modules.values())
    with pytest.raises(RuntimeError, match="no backward pass"):
        _ = tracer.grads

    with pytest.raises(RuntimeError, match="boom"), KeyValueTracer(modules, edit_positions(batch["labels"])):
        model(**batch)
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in modules.values())


def test_errors_for_no_grad_and_wrong_mask(model):
    batch = make_batch()
    modules = linear_modules(model, [TOP])
    with KeyValueTracer(modules, edit_positions(batch["labels"])), torch.no_grad():
        with pytest.raises(RuntimeError, match="does not require grad"):
            model(**batch)
    with KeyValueTracer(modules, edit_positions(batch["labels"][:, :-1])):
        with pytest.raises(ValueError, match="does not match"):
            model(**batch)
    with pytest.raises(ValueError, match="boolean"):
        KeyValueTracer(modules, batch["labels"])
    assert not modules[TOP]._forward_hooks
