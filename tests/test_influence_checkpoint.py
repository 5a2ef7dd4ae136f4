"""CheckpointGradients at a saved warmup checkpoint: flat gradients equal the per-example loop whatever the
micro-batch, preconditioned ones equal `adam_preconditioned` of them, features are the reduced gradients."""

from __future__ import annotations

import pytest
import torch

from trustray.core.influence.checkpoint import CheckpointGradients, check_preconditionable
from trustray.core.influence.gradients import (
    adam_preconditioned,
    flatten_optimizer_state,
    per_example_gradients_loop,
)
from trustray.core.influence.reductions import build_reduction
from trustray.core.influence.warmup import OPTIMIZER_FILE, save_checkpoint
from trustray.core.lm.batching import collate, encode_chat

torch.set_num_threads(1)


def _conversation(index: int) -> list[dict[str, str]]:
    """Responses of 2 to 4 sentences, so micro-batches mix lengths and right padding."""
    answer = " ".join(["It is a thing."] * (2 + index % 3))
    return [{"role": "user", "content": f"Describe item {index}."}, {"role": "assistant", "content": answer}]


def _base(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def encoded(tiny_llama_dir) -> list[dict[str, list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return [encode_chat(tokenizer, _conversation(index), 64) for index in range(5)]


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, encoded, tmp_path_factory):
    """A LoRA checkpoint after two AdamW steps (non-trivial moments), saved the way the warmup saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(_base(tiny_llama_dir), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.99))
    for start in (0, 2):
        model(**collate(encoded[start : start + 3], 0)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return save_checkpoint(tmp_path_factory.mktemp("checkpoint") / "checkpoint-2", model, optimizer, 2, 1e-2, 1.0)


def _load(tiny_llama_dir: str, checkpoint, precondition: bool, micro_batch_size: int) -> CheckpointGradients:
    return CheckpointGradients.load(checkpoint, _base(tiny_llama_dir), precondition, micro_batch_size)


def _loop(gradients: CheckpointGradients, encoded) -> torch.Tensor:
    return per_example_gradients_loop(gradients.model, collate(encoded, 0))


@pytest.mark.parametrize("micro_batch_size", [1, 2, 5])
def test_flat_gradients_equal_the_per_example_loop(tiny_llama_dir, checkpoint, encoded, micro_batch_size):
    gradients = _load(tiny_llama_dir, checkpoint, precondition=False, micro_batch_size=micro_batch_size)
    flat = gradients.flat(encoded)
    reference = _loop(gradients, encoded)
    assert flat.shape == reference.shape and flat.shape[0] == len(encoded)
    for row, expected in zip(flat, reference, strict=True):
        assert float((row - expected).norm() / expected.norm()) <= 1e-5
    batches = list(gradients.batches(encoded))
    assert [batch.batch_size for batch in batches] == [
        min(micro_batch_size, len(encoded) - start) for start in range(0, len(encoded), micro_batch_size)
    ]


def test_preconditioned_gradients_equal_adam_preconditioned(tiny_llama_dir, checkpoint, encoded):
    gradients = _load(tiny_llama_dir, checkpoint, precondition=True, micro_batch_size=2)
    state = torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True)
    exp_avg, exp_avg_sq, step = flatten_optimizer_state(gradients.model, state)
    assert step == 2 and exp_avg.abs().max() > 0
    expected = adam_preconditioned(_loop(gradients, encoded), exp_avg, exp_avg_sq, step, betas=(0.8, 0.99))
    torch.testing.assert_close(gradients.flat(encoded, precondition=True), expected, rtol=1e-4, atol=1e-5)
    # Elementwise, so preconditioning micro-batch by micro-batch is preconditioning the whole matrix.
    flat = gradients.flat(encoded)
    per_batch = torch.cat([gradients.precondition(batch.flat()) for batch in gradients.batches(encoded)])
    torch.testing.assert_close(per_batch, gradients.precondition(flat), rtol=0, atol=0)


def test_features_are_reduced_gradients(tiny_llama_dir, checkpoint, encoded):
    gradients = _load(tiny_llama_dir, checkpoint, precondition=True, micro_batch_size=2)
    reduction = build_reduction("gaussian", 16, seed=0)
    for precondition in (False, True):
        features = gradients.features(encoded, reduction, precondition)
        expected = reduction.transform(gradients.flat(encoded, precondition))
        assert features.shape == (len(encoded), 16) and features.dtype == torch.float32
        # Projections of a micro-batch or of all rows at once differ only by float summation order.
        assert float(((features - expected).norm(dim=1) / expected.norm(dim=1)).max()) <= 1e-5


def test_preconditioning_needs_optimizer_state_and_a_flat_reduction(tiny_llama_dir, checkpoint, encoded):
    plain = _load(tiny_llama_dir, checkpoint, precondition=False, micro_batch_size=2)
    with pytest.raises(ValueError, match="optimizer state"):
        plain.flat(encoded, precondition=True)
    kron = build_reduction("kron", 16, seed=0)
    check_preconditionable(kron, precondition=False)
    with pytest.raises(ValueError, match="flat gradient"):
        plain.features(encoded, kron, precondition=True)
