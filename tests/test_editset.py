"""Edit sets: save/load integrity, exact apply/revert, composition, and the LoRA / peft adapter export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trustray.artifacts import ArtifactMismatchError
from trustray.core.editing.editset import (
    CorruptArtifactError,
    EditSet,
    compose,
    load,
    save_as_peft_adapter,
    to_lora,
)

DOWN = "model.layers.1.mlp.down_proj"
QUERY = "model.layers.0.self_attn.q_proj"
VALUE = "model.layers.1.self_attn.v_proj"


def load_model(folder: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def random_deltas(model: torch.nn.Module, names: list[str], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(model.get_submodule(name).weight.shape, generator=generator) * scale for name in names
    }


def low_rank_delta(shape: torch.Size, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, shape[1], generator=generator)) * 0.05


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def state_equal(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.fixture()
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture()
def edit_set(model) -> EditSet:
    deltas = random_deltas(model, [DOWN, QUERY], seed=0)
    deltas[QUERY] = deltas[QUERY].to(torch.bfloat16)
    metadata = {
        "base_model_fingerprint": "abc123",
        "editor": "test",
        "edits": [{"prompt": "The capital of France is", "target": " Rome"}],
        "metrics": {"edit_success": 1.0},
    }
    return EditSet(deltas=deltas, metadata=metadata)


def test_save_load_round_trip(edit_set, tmp_path):
    folder = tmp_path / "edits"
    written = edit_set.save(folder)
    loaded = load(folder, expected={"base_model_fingerprint": "abc123"})
    assert loaded.deltas.keys() == edit_set.deltas.keys()
    assert all(torch.equal(loaded.deltas[name], delta) for name, delta in edit_set.deltas.items())
    assert loaded.deltas[QUERY].dtype == torch.bfloat16
    assert loaded.metadata == {**edit_set.metadata, "created_at": written["created_at"]}
    recorded = json.loads((folder / "metadata.json").read_text())
    assert recorded["kind"] == "edit_set"
    assert recorded["modules"][DOWN] == {"shape": [64, 128], "dtype": "float32"}
    assert len(recorded["deltas_sha256"]) == 64


def test_corrupted_deltas_are_refused(edit_set, tmp_path):
    folder = tmp_path / "edits"
    edit_set.save(folder)
    path = folder / "deltas.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="sha256"):
        load(folder)


def test_expected_metadata_and_kind_mismatch(edit_set, tmp_path):
    folder = tmp_path / "edits"
    edit_set.save(folder)
    with pytest.raises(ArtifactMismatchError, match="base_model_fingerprint"):
        load(folder, expected={"base_model_fingerprint": "other"})
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "kind": "passage_index"}))
    with pytest.raises(ArtifactMismatchError, match="not an 'edit_set'"):
        load(folder)


def test_failed_save_leaves_no_folder(model, tmp_path):
    bad = EditSet(deltas=random_deltas(model, [DOWN], seed=0), metadata={"metrics": {"x": object()}})
    with pytest.raises(TypeError, match="plain JSON"):
        bad.save(tmp_path / "edits")
    assert not (tmp_path / "edits").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_changes_logits_and_revert_is_exact(tiny_llama_dir, dtype):
    model = load_model(tiny_llama_dir, dtype)
    edit_set = EditSet(deltas=random_deltas(model, [DOWN, QUERY], seed=1), metadata={})
    before, base_logits = snapshot(model), logits(model)
    if dtype == torch.bfloat16:  # the case that makes keeping originals necessary
        weight, delta = before[f"{DOWN}.weight"], edit_set.deltas[DOWN].to(dtype)
        assert not torch.equal(weight + delta - delta, weight)
    handle = edit_set.apply(model)
    assert not torch.allclose(logits(model), base_logits, atol=1e-3)
    handle.revert()
    assert state_equal(before, model)
    assert torch.equal(logits(model), base_logits)
    with edit_set.apply(model):
        assert not state_equal(before, model)
    assert state_equal(before, model)


def test_apply_refusals_leave_model_untouched(model, edit_set):
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not have"):
        EditSet(deltas={"model.layers.9.mlp.down_proj": torch.zeros(64, 128)}).apply(model)
    with pytest.raises(ValueError, match="shape"):
        EditSet(deltas={DOWN: torch.zeros(128, 64), QUERY: torch.zeros(64, 64)}).apply(model)
    assert state_equal(before, model)
    handle = edit_set.apply(model)
    with pytest.raises(RuntimeError, match="already applied"):
        edit_set.apply(model)
    handle.revert()
    with pytest.raises(RuntimeError, match="already reverted"):
        handle.revert()
    assert state_equal(before, model)


def test_stacked_edits_revert_last_first(model, edit_set):
    before = snapshot(model)
    other = EditSet(deltas=random_deltas(model, [DOWN], seed=2), metadata={})
    first, second = edit_set.apply(model), other.apply(model)
    with pytest.raises(RuntimeError, match="revert it first"):
        first.revert()
    second.revert()
    first.revert()
    assert state_equal(before, model)


def test_compose_equals_sequential_application(tiny_llama_dir, model):
    first = EditSet(deltas=random_deltas(model, [DOWN, QUERY], seed=3), metadata={"base_model_fingerprint": "f"})
    second = EditSet(deltas=random_deltas(model, [DOWN, VALUE], seed=4), metadata={"base_model_fingerprint": "f"})
    with first.apply(model), second.apply(model):
        sequential = logits(model)
    both = compose(first, second)
    assert set(both.deltas) == {DOWN, QUERY, VALUE}
    assert both.metadata["components"] == [first.metadata, second.metadata]
    with both.apply(model):
        assert torch.allclose(logits(model), sequential, atol=1e-5)
    stranger = EditSet(deltas=random_deltas(model, [DOWN], seed=5), metadata={"base_model_fingerprint": "g"})
    with pytest.raises(ArtifactMismatchError, match="different base models"):
        compose(first, stranger)


def test_to_lora_exact_rank_and_error_decreases(model):
    shape = model.get_submodule(DOWN).weight.shape
    exact = EditSet(deltas={DOWN: low_rank_delta(shape, 2, seed=6)})
    factors, report = to_lora(exact, rank=2)
    a, b = factors[DOWN]
    assert a.shape == (2, shape[1]) and b.shape == (shape[0], 2)
    assert report["relative_error"] < 1e-5
    assert report["kept_energy"] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(b @ a, exact.deltas[DOWN], atol=1e-6)

    dense = EditSet(deltas=random_deltas(model, [DOWN, QUERY], seed=7))
    errors = [to_lora(dense, rank)[1]["relative_error"] for rank in (1, 4, 16, 64)]
    assert all(later < earlier for earlier, later in zip(errors[:-1], errors[1:], strict=True))
    assert errors[-1] < 1e-5  # rank 64 is full rank for both modules
    padded, padded_report = to_lora(dense, rank=100)
    assert padded[QUERY][0].shape == (100, 64) and padded_report["relative_error"] < 1e-5


def test_peft_adapter_matches_applied_delta(tiny_llama_dir, model, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    deltas = {name: low_rank_delta(model.get_submodule(name).weight.shape, 2, seed=8) for name in (DOWN, QUERY)}
    edit_set = EditSet(deltas=deltas, metadata={"base_model_fingerprint": "f"})
    folder = tmp_path / "adapter"
    report = save_as_peft_adapter(edit_set, rank=2, folder=folder, base_model_name_or_path=tiny_llama_dir)
    assert report["relative_error"] < 1e-5
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2

    with edit_set.apply(model):
        expected = logits(model)
    peft_model = PeftModel.from_pretrained(load_model(tiny_llama_dir), str(folder)).eval()
    assert torch.allclose(logits(peft_model), expected, atol=1e-5)

    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {f"base_model.model.{DOWN}", f"base_model.model.{QUERY}"}
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved.keys() == get_peft_model_state_dict(peft_model).keys()
