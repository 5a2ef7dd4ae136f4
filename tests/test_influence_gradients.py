"""Per-example LoRA gradients: batched hooks vs a per-example loop, batch sums, bf16, hygiene, Adam features."""

from __future__ import annotations

import pytest
import torch

from trustray.core.influence.gradients import (
    adam_preconditioned,
    flatten_optimizer_state,
    lora_modules,
    per_example_gradients,
    per_example_gradients_loop,
)

torch.set_num_threads(1)


def _lora_model(folder: str, dtype: torch.dtype = torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(model, config).eval()


def make_batch(lengths=(12, 8, 5), prompts=(3, 2, 1), seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded examples of different lengths whose first `prompt` tokens carry no loss."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(5, 200, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    labels = input_ids.clone()
    for i, (length, prompt) in enumerate(zip(lengths, prompts, strict=True)):
        attention_mask[i, :length] = 1
        input_ids[i, length:] = 3
        labels[i, length:] = -100
        labels[i, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return _lora_model(tiny_llama_dir)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_lora_modules_order_and_shapes(model):
    modules = lora_modules(model)
    names = [name for name, _ in modules]
    assert len(modules) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert names[0].endswith("q_proj.lora_A.default") and names[1].endswith("q_proj.lora_B.default")
    assert names == [name for name, _ in lora_modules(model)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [layer.weight for _, layer in modules] == trainable


def test_batched_equals_loop_with_padding_and_prompt_masks(model):
    batch = make_batch()
    grads = per_example_gradients(model, batch)
    flat = grads.flat()
    reference = per_example_gradients_loop(model, batch)
    assert flat.shape == (3, grads.dim) == reference.shape
    for i in range(3):
        assert _relative(flat[i], reference[i]) <= 1e-5
    assert grads.loss.shape == (3,)
    assert all(reference[i].norm() > 0 for i in range(3))
    # Padded positions contribute nothing: every module's output gradient is zero there.
    for _, output_grad in grads.factors.values():
        assert output_grad[1, 8:].abs().max() == 0 and output_grad[2, 5:].abs().max() == 0


def test_sum_of_per_example_gradients_is_the_batch_gradient(model):
    batch = make_batch(seed=1)
    flat = per_example_gradients(model, batch).flat()
    params = [layer.weight for _, layer in lora_modules(model)]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_labels = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
    )
    per_example = token_loss.sum(1) / (shift_labels != -100).sum(1)
    batch_grad = torch.cat([g.flatten() for g in torch.autograd.grad(per_example.sum(), params)])
    assert _relative(flat.sum(0), batch_grad) <= 1e-5


def test_hooks_removed_and_grads_untouched(model):
    batch = make_batch(seed=2)
    layers = [layer for _, layer in lora_modules(model)]
    per_example_gradients(model, batch)
    assert all(not layer._forward_hooks and not layer._backward_hooks for layer in layers)
    assert all(p.grad is None for p in model.parameters())
    per_example_gradients_loop(model, batch)
    assert all(p.grad is None for p in model.parameters())
    broken = dict(batch, labels=batch["labels"][:, :3])
    with pytest.raises(ValueError):  # labels of the wrong length fail inside the loss, after the hooks are set
        per_example_gradients(model, broken)
    assert all(not layer._forward_hooks and not layer._backward_hooks for layer in layers)


def test_bf16_close_to_fp32(tiny_llama_dir, model):
    batch = make_batch(seed=3)
    fp32 = per_example_gradients(model, batch).flat()
    bf16_model = _lora_model(tiny_llama_dir, torch.bfloat16)
    bf16 = per_example_gradients(bf16_model, batch)
    assert all(x.dtype == torch.float32 for pair in bf16.factors.values() for x in pair)
    cosine = torch.nn.functional.cosine_similarity(bf16.flat(), fp32, dim=1)
    assert cosine.min() > 0.98


def test_adam_preconditioned_matches_hand_computation_and_a_real_adamw_step(model):
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    try:
        for seed in (10, 11):  # two warm-up steps give non-trivial moments
            optimizer.zero_grad()
            batch = make_batch(seed=seed)
            model(**batch).loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        exp_avg, exp_avg_sq, step = flatten_optimizer_state(model, optimizer.state_dict())
        assert step == 2
        gradient = per_example_gradients(model, make_batch(lengths=(9,), prompts=(2,), seed=12)).flat()
        feature = adam_preconditioned(gradient, exp_avg, exp_avg_sq, step)

        m = 0.9 * exp_avg + 0.1 * gradient[0]
        v = 0.999 * exp_avg_sq + 0.001 * gradient[0] ** 2
        by_hand = (m / (1 - 0.9**3)) / ((v / (1 - 0.999**3)).sqrt() + 1e-8)
        assert torch.allclose(feature[0], by_hand, rtol=1e-5, atol=1e-7)

        before = torch.cat([p.detach().flatten() for p in trainable])
        offset = 0
        for p in trainable:
            p.grad = gradient[0, offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
        after = torch.cat([p.detach().flatten() for p in trainable])
        assert torch.allclose(before - after, 1e-2 * feature[0], rtol=1e-4, atol=1e-7)
    finally:
        with torch.no_grad():
            for p, value in zip(trainable, saved, strict=True):
                p.copy_(value)
                p.grad = None
