"""Scoped edit sets: the change acts at the positions near its keys and nowhere else, on a module, an EditSet, the
transformers engine and memit's output; it round-trips through save/load, and the paths that need a plain weight
change refuse it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trustray.core.editing.editset import CorruptArtifactError, EditSet, compose, load, to_lora
from trustray.core.editing.factory import build_editor
from trustray.core.editing.scope import EditScope
from trustray.models.engines import EngineConfig
from trustray.models.hf_engine import HFEngine
from trustray.models.tiny import TINY_CORPUS

torch.set_num_threads(1)

DOWN = "model.layers.1.mlp.down_proj"
EDITED = "The capital of France is"
UNRELATED = ["Water boils at", "Apple is headquartered in Cupertino"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def down_inputs(model, tokenizer, text: str) -> torch.Tensor:
    """The inputs of `DOWN` at every position of `text` ([T, in_features])."""
    captured = {}
    handle = model.get_submodule(DOWN).register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    return captured["x"][0]


def scoped_set(model, tokenizer, threshold: float = 0.99) -> EditSet:
    """A random change of `DOWN`, scoped to the last position of `EDITED`."""
    weight = model.get_submodule(DOWN).weight
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    key = down_inputs(model, tokenizer, EDITED)[-1:]
    return EditSet({DOWN: delta}, {"base_model_fingerprint": "tiny"}, EditScope({DOWN: key}, threshold))


def last_logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0, -1]


def test_scope_checks_its_inputs():
    with pytest.raises(ValueError, match="cosine"):
        EditScope({DOWN: torch.ones(1, 4)}, 1.5)
    with pytest.raises(ValueError, match="non-empty"):
        EditScope({DOWN: torch.ones(0, 4)}, 0.5)
    scope = EditScope({DOWN: torch.tensor([[2.0, 0.0], [0.0, 3.0]])}, 0.9)
    assert torch.equal(scope.keys[DOWN], torch.eye(2))  # unit rows
    inputs = torch.tensor([[[5.0, 0.1], [1.0, 1.0], [0.0, -1.0]]])
    assert scope.in_scope(DOWN, inputs).tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="no keys"):
        EditSet({"model.layers.0.mlp.down_proj": torch.zeros(2, 2)}, scope=scope)


def test_a_scoped_set_changes_its_key_position_only_and_never_the_weights(tiny):
    model, tokenizer = tiny
    before = {key: value.clone() for key, value in model.state_dict().items()}
    base = {text: last_logits(model, tokenizer, text) for text in [EDITED, *UNRELATED]}
    edit_set = scoped_set(model, tokenizer)
    with edit_set.apply(model):
        assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
        assert not torch.allclose(last_logits(model, tokenizer, EDITED), base[EDITED], atol=1e-3)
        for text in UNRELATED:
            assert torch.equal(last_logits(model, tokenizer, text), base[text])
        # The same edit set unscoped moves the unrelated prompts too: the scope is what keeps them.
        with EditSet(edit_set.deltas).apply(model):
            assert not torch.allclose(last_logits(model, tokenizer, UNRELATED[0]), base[UNRELATED[0]], atol=1e-3)
    assert torch.equal(last_logits(model, tokenizer, EDITED), base[EDITED])
    # A threshold every position passes is the plain weight change.
    everywhere = EditSet(edit_set.deltas, scope=EditScope(edit_set.scope.keys, -1.0))
    with everywhere.apply(model):
        scoped_everywhere = last_logits(model, tokenizer, UNRELATED[0])
    with EditSet(edit_set.deltas).apply(model):
        assert torch.allclose(scoped_everywhere, last_logits(model, tokenizer, UNRELATED[0]), atol=1e-5)


def test_save_load_keeps_the_scope_and_checks_it(tiny, tmp_path):
    model, tokenizer = tiny
    edit_set = scoped_set(model, tokenizer, threshold=0.8)
    metadata = edit_set.save(tmp_path / "set")
    assert metadata["scope_threshold"] == 0.8 and "scope_sha256" in metadata
    loaded = load(tmp_path / "set", {"base_model_fingerprint": "tiny"})
    assert loaded.scope.threshold == 0.8 and torch.equal(loaded.scope.keys[DOWN], edit_set.scope.keys[DOWN])
    assert load(tmp_path / "set").metadata == {"base_model_fingerprint": "tiny", "created_at": metadata["created_at"]}
    (tmp_path / "set" / "scope.safetensors").write_bytes(b"broken")
    with pytest.raises(CorruptArtifactError, match="scope"):
        load(tmp_path / "set")


def test_paths_that_need_a_plain_weight_change_refuse_a_scoped_set(tiny):
    model, tokenizer = tiny
    edit_set = scoped_set(model, tokenizer)
    with pytest.raises(ValueError, match="scoped"):
        to_lora(edit_set, rank=2)
    with pytest.raises(ValueError, match="scoped"):
        compose(edit_set, EditSet(edit_set.deltas, {"base_model_fingerprint": "tiny"}))


def test_the_transformers_engine_serves_a_scoped_set_as_hooks(tiny, tiny_llama_dir):
    model, tokenizer = tiny
    engine = HFEngine(EngineConfig(model=tiny_llama_dir, engine="hf", max_model_len=128, torch_threads=1), "cpu")
    edit_set = scoped_set(model, tokenizer)
    weights = {f"{name}.weight": delta for name, delta in edit_set.deltas.items()}
    prompts, continuations = [EDITED, *UNRELATED], [" Paris", " 100 degrees", " California"]
    base = engine.score(prompts, continuations)
    before = {key: value.clone() for key, value in engine.model.state_dict().items()}
    engine.apply_delta("scoped", weights, edit_set.scope)
    edited = engine.score(prompts, continuations)
    assert all(torch.equal(before[key], value) for key, value in engine.model.state_dict().items())
    assert edited[0] != pytest.approx(base[0], abs=1e-4)
    assert edited[1:] == base[1:]
    with pytest.raises(ValueError, match="already applied"):
        engine.apply_delta("scoped", weights, edit_set.scope)
    engine.revert_delta("scoped")
    assert engine.score(prompts, continuations) == base
    with pytest.raises(ValueError, match="no keys"):
        engine.apply_delta("other", {"model.layers.0.mlp.down_proj.weight": torch.zeros_like(weights[f"{DOWN}.weight"])},
                           edit_set.scope)


def test_memit_returns_its_keys_as_the_scope_unless_unscoped(tiny):
    model, tokenizer = tiny
    settings = {"modules": {"layers": [0]}, "covariance_weight": 1.0, "general_text": TINY_CORPUS[:20],
                "target_steps": 5, "scope_threshold": 0.9}
    records = [{"prompt": "What is the colour of the tower?", "subject": "the tower", "target_new": "purple"},
               {"prompt": "Where does the old river flow?", "subject": "the old river", "target_new": "north"}]
    editor = build_editor("memit", model, tokenizer, "tiny", settings=settings)
    deltas = editor.compute_deltas(records)
    scope = editor.edit_scope()
    assert scope.threshold == 0.9 and sorted(scope.keys) == sorted(deltas) == ["model.layers.0.mlp.down_proj"]
    assert scope.keys["model.layers.0.mlp.down_proj"].shape == (2, deltas["model.layers.0.mlp.down_proj"].shape[1])
    unscoped = build_editor("memit", model, tokenizer, "tiny", settings={**settings, "scope_threshold": None})
    assert torch.allclose(unscoped.compute_deltas(records)["model.layers.0.mlp.down_proj"],
                          deltas["model.layers.0.mlp.down_proj"])
    assert unscoped.edit_scope() is None


def test_a_serve_config_refuses_scoped_edit_sets_on_vllm():
    from pydantic import ValidationError

    from trustray.serve_apps.config import ServeConfig

    with pytest.raises(ValidationError, match="scoped edit sets"):
        ServeConfig.model_validate({"chat": {"engine": "vllm"}, "edits": {}})
    plain = ServeConfig.model_validate({"chat": {"engine": "vllm"},
                                        "edits": {"editor_settings": {"scope_threshold": None}}})
    assert not plain.edits.scoped()
    assert ServeConfig.model_validate({"chat": {"engine": "hf"}, "edits": {}}).edits.scoped()
    assert not ServeConfig.model_validate({"chat": {"engine": "vllm"}, "edits": {"editor": "ft"}}).edits.scoped()
