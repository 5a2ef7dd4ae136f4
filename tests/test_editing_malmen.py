"""MALMEN on the tiny Llama: identity init, exact two-stage meta-gradient, bookkeeping, training, persistence, prefix."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.func import functional_call

from trustray.core.editing import base as editing_base
from trustray.core.editing.base import batches, encode_pairs
from trustray.core.editing.editset import EditSet
from trustray.core.editing.evaluation import answer_examples
from trustray.core.editing.malmen import (
    MalmenEditor,
    RunningNormalizer,
    ShiftNet,
    _answer_nll,
    _kl,
)
from trustray.core.editing.metrics import answer_predictions, token_accuracy
from trustray.core.editing.ridge import ridge
from trustray.models.tiny import TINY_CORPUS

torch.set_num_threads(1)

COLOURS = ["blue", "red", "green", "black", "white", "yellow"]
CITIES = ["Paris", "Rome", "Cupertino", "Redmond"]


def make_records(count: int, offset: int = 0) -> list[dict]:
    """Synthetic edits "thing i has colour c", two paraphrases and two locality questions each."""
    return [
        {
            "prompt": f"What is the colour of thing {i}?",
            "target_new": COLOURS[(7 * i + 3) % len(COLOURS)],
            "paraphrases": [f"Which colour does thing {i} have?", f"Thing {i} has what colour?"],
            "locality": [
                {"prompt": f"Where is city {i}?", "answer": CITIES[i % len(CITIES)]},
                {"prompt": f"Who founded town {i}?", "answer": "Rome"},
            ],
        }
        for i in range(offset, offset + count)
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def settings(**overrides) -> dict:
    base = {"modules": {"layers": [0, 1]}, "rank": 8, "batch_size": 16, "meta_lr": 1e-3, "scalar_lr": 0.1}
    return {**base, **overrides}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(param.grad is None and param.requires_grad for param in model.parameters())


def perturb(editor: MalmenEditor, seed: int = 0) -> None:
    """Move the hyper-networks off the identity so every parameter has a non-zero meta-gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in editor.nets.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.add_(noise * (0.5 if "log_" in name else 0.05))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def grads_of(editor: MalmenEditor) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in editor.nets.named_parameters()}


def test_running_normalizer_merges_batches_exactly():
    rows = torch.randn(50, 6, dtype=torch.float64) * 3 + 1
    normalizer = RunningNormalizer(6)
    assert torch.equal(normalizer(rows[:3].float()), rows[:3].float())  # identity before two rows are seen
    for chunk in rows.split(7):
        normalizer.update(chunk)
    torch.testing.assert_close(normalizer.mean, rows.mean(0))
    expected = (rows.float() - rows.mean(0).float()) / rows.std(0).float()
    torch.testing.assert_close(normalizer(rows.float()), expected, rtol=1e-5, atol=1e-5)


def test_shiftnet_is_the_normalised_identity_at_init():
    generator = torch.Generator().manual_seed(0)
    net = ShiftNet(12, 5, rank=4, n_blocks=2, n_layers=3, lr_init=1e-2, log_lambda_init=0.0, generator=generator)
    keys, grads = torch.randn(20, 12) * 4, torch.randn(20, 5) * 1e-3
    net.normalizer.update(torch.cat([keys, grads], dim=-1))
    normalised = net.normalizer(torch.cat([keys, grads], dim=-1))
    pseudo_keys, pseudo_grads = net(keys, grads, 2)
    assert torch.equal(pseudo_keys, normalised[:, :12]) and torch.equal(pseudo_grads, normalised[:, 12:])
    diffs = net.value_diffs(keys, grads, 1)
    torch.testing.assert_close(diffs, -1e-2 * (keys * normalised[:, :12]).sum(-1, keepdim=True) * normalised[:, 12:])
    with pytest.raises(ValueError, match="rank 18 exceeds"):
        ShiftNet(12, 5, rank=18, n_blocks=1, n_layers=1, lr_init=1.0, log_lambda_init=0.0, generator=generator)


def test_compute_deltas_shapes_rows_and_clean_model(model, tokenizer):
    records = make_records(5)
    before = snapshot(model)
    editor = MalmenEditor(model, tokenizer, settings(batch_size=2))
    cached = editor.cache(records)
    # Keys where the answer's own tokens are predicted, not the end of turn after them (`key_end_of_turn`).
    encoded = answer_examples(tokenizer, [r["prompt"] for r in records], [r["target_new"] for r in records], 128)
    answer_tokens = sum(sum(label != -100 for label in example["labels"]) for example in encoded)
    for name, (keys, grads) in cached.items():
        module = model.get_submodule(name)
        assert keys.shape == (answer_tokens, module.in_features) and grads.shape == (answer_tokens, module.out_features)
    with_end = MalmenEditor(model, tokenizer, settings(batch_size=2, key_end_of_turn=True)).cache(records)
    assert all(keys.shape[0] == answer_tokens + len(records) for keys, _ in with_end.values())
    with torch.no_grad():  # as an inference caller would: the editor enables gradients itself
        deltas = editor.compute_deltas(records)
    assert set(deltas) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    for name, delta in deltas.items():
        assert delta.shape == model.get_submodule(name).weight.shape and delta.dtype == torch.float32
        assert torch.isfinite(delta).all() and delta.abs().sum() > 0
    assert float(editor.nets["128x64"].normalizer.count) == 0  # compute_deltas never updates the statistics
    assert_unchanged(model, before)

    # The cached rows are the gradient of the answer NLL computed on the full logits: Σ_t g_t k_tᵀ = ∂L/∂W in the
    # top layer (lower layers also reach the answers through attention from prompt positions, which are not cached).
    one_batch = MalmenEditor(model, tokenizer, settings(batch_size=len(records))).cache(records)
    batch = batches(encoded, 8, "cpu")[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    names = ["model.layers.1.mlp.down_proj"]
    weight_grads = torch.autograd.grad(loss, [model.get_submodule(name).weight for name in names])
    for name, weight_grad in zip(names, weight_grads, strict=True):
        keys, grads = one_batch[name]
        torch.testing.assert_close(grads.T @ keys, weight_grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_streamed_deltas_equal_one_solve_over_all_rows(model, tokenizer):
    records = make_records(5)
    editor = MalmenEditor(model, tokenizer, settings(batch_size=2))  # 3 sub-batches, the last one partial
    with torch.no_grad():
        whole = {name: solution.T for name, solution in editor._solve(editor.cache(records)).items()}
    streamed = editor.compute_deltas(records)
    assert streamed.keys() == whole.keys()
    for name, delta in whole.items():
        torch.testing.assert_close(streamed[name], delta, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        editor.compute_deltas([])


def test_long_edits_log_their_progress(model, tokenizer, monkeypatch, caplog):
    records = make_records(5)
    editor = MalmenEditor(model, tokenizer, settings(batch_size=2))
    with caplog.at_level(logging.INFO, logger="trustray.core.editing.base"):
        editor.compute_deltas(records)
    assert not caplog.records  # a quick edit stays quiet
    monkeypatch.setattr(editing_base, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="trustray.core.editing.base"):
        editor.compute_deltas(records)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [
        f"malmen: keys and value shifts: {done} / 5 edits" for done in (2, 4, 5)
    ]
    assert lines[-1].endswith("about 0 s left)")


def test_a_partial_sub_batch_gets_value_gradients_of_a_full_ones_scale(model, tokenizer):
    same_length = [{"prompt": f"What is the colour of thing {i}?", "target_new": "blue", "paraphrases": [],
                    "locality": []} for i in range(2)]
    editor = MalmenEditor(model, tokenizer, settings(batch_size=2))
    top = "model.layers.1.mlp.down_proj"
    alone_keys, alone_grads = editor.cache(same_length[:1])[top]
    keys, grads = editor.cache(same_length)[top]
    rows = len(alone_keys)
    torch.testing.assert_close(alone_keys, keys[:rows])
    torch.testing.assert_close(alone_grads, grads[:rows])  # not twice as large because it had the batch alone


def test_chunked_stage_two_equals_unchunked(model, tokenizer):
    records = make_records(6)
    grads = []
    for chunk in (3, 4096):
        editor = MalmenEditor(model, tokenizer, settings(hyper_chunk=chunk))
        perturb(editor)
        editor.meta_backward(records)
        grads.append(grads_of(editor))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def differentiable_meta_loss(editor: MalmenEditor, model, tokenizer, records, general) -> torch.Tensor:
    """The meta-loss as one autograd graph: value diffs → RidgeSolve → functional weights → losses."""
    s = editor.settings
    cached = editor.cache(records)
    params = {}
    for name, (keys, grads) in cached.items():
        net, layer = editor.hypernet(name)
        prior = editor.preservation_prior(name, keys.shape[0])
        solution = ridge(keys, net.value_diffs(keys, grads, layer), net.log_lambda[layer].exp(), prior)
        params[f"{name}.weight"] = model.get_submodule(name).weight.detach() + solution.T
    pairs = editor.meta_pairs(records)
    [gen] = batches(encode_pairs(tokenizer, *pairs["gen"]), 64, "cpu")
    [loc] = batches(encode_pairs(tokenizer, *pairs["loc"]), 64, "cpu")
    ids = [tokenizer(text)["input_ids"] for text in general]
    [text] = batches([{"input_ids": i, "labels": i} for i in ids], 64, "cpu")

    def logits(batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return functional_call(model, params, args=(), kwargs=inputs).logits

    def pre_logits(batch):
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return (
        _answer_nll(logits(gen), gen["labels"])
        + s.loc_coef * _kl(pre_logits(loc), logits(loc), loc["labels"])
        + s.retention_coef * _kl(pre_logits(text), logits(text), text["labels"])
    )


@pytest.mark.parametrize(("preserve_weight", "preserve_units"), [(0.0, "rows"), (3.0, "rows"), (0.2, "edit_keys")])
def test_two_stage_meta_gradient_equals_autograd(model, tokenizer, preserve_weight, preserve_units):
    records, general = make_records(6), TINY_CORPUS[:3]
    # η₀ large enough that the locality and retention terms carry several percent of the gradient.
    editor = MalmenEditor(model, tokenizer, settings(loc_coef=0.7, retention_coef=0.5, batch_size=64, lr_init=0.03,
                                                     preserve_weight=preserve_weight, preserve_units=preserve_units))
    kept = make_records(5, offset=20)
    editor.fit_preservation([r["locality"][0]["prompt"] for r in kept], [r["locality"][0]["answer"] for r in kept])
    perturb(editor)
    editor.nets.zero_grad()
    stats = editor.meta_backward(records, general)
    assert stats["loc_loss"] > 1e-3 and stats["retention_loss"] > 1e-3
    two_stage = grads_of(editor)
    # Same normaliser statistics (meta_backward updated them before its forward) and the same draws (step 0).
    loss = differentiable_meta_loss(editor, model, tokenizer, records, general)
    assert float(loss.detach()) == pytest.approx(stats["loss"], rel=1e-5)
    names = [name for name, _ in editor.nets.named_parameters()]
    reference = dict(zip(names, torch.autograd.grad(loss, list(editor.nets.parameters())), strict=True))
    flat = torch.cat([two_stage[name].flatten() for name in names])
    assert relative(flat, torch.cat([reference[name].flatten() for name in names])) < 1e-4
    for name in names:
        assert relative(two_stage[name], reference[name]) < 1e-3, name
    assert reference["128x64.log_lambda"].abs().min() > 0 and reference["128x64.log_lr"].abs().min() > 0


def edit_success(editor: MalmenEditor, model, tokenizer, records) -> float:
    """Teacher-forced token accuracy of `target_new` on the edit prompts, with the editor's deltas applied."""
    [batch] = batches(encode_pairs(tokenizer, [r["prompt"] for r in records], [r["target_new"] for r in records]), 64, "cpu")
    with EditSet(editor.compute_deltas(records)).apply(model):
        return float(token_accuracy(*answer_predictions(model, batch)).mean())


def test_meta_training_raises_edit_success_and_reverts_exactly(model, tokenizer):
    train, held_out = make_records(16), make_records(16, offset=40)
    before = snapshot(model)
    editor = MalmenEditor(model, tokenizer, settings())
    initial = edit_success(editor, model, tokenizer, train), edit_success(editor, model, tokenizer, held_out)
    history = [editor.meta_step(train) for _ in range(40)]
    final = edit_success(editor, model, tokenizer, train), edit_success(editor, model, tokenizer, held_out)
    assert history[-1]["gen_loss"] < history[0]["gen_loss"] - 0.3
    assert final[0] > initial[0] + 0.3 and final[1] > initial[1] + 0.2
    assert history[-1]["log_eta"] > history[0]["log_eta"]  # learned a larger step
    assert editor.steps == 40
    assert_unchanged(model, before)


def test_state_dict_round_trip_and_resume(model, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    records = make_records(8)
    editor = MalmenEditor(model, tokenizer, settings())
    for _ in range(2):
        editor.meta_step(records)
    save_file(editor.state_dict(), str(tmp_path / "malmen.safetensors"))
    restored = MalmenEditor(model, tokenizer, settings())  # same settings: the seed also drives the draws
    perturb(restored)
    restored.load_state_dict(load_file(str(tmp_path / "malmen.safetensors")))
    assert restored.steps == 2
    expected, actual = editor.compute_deltas(records), restored.compute_deltas(records)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    editor.meta_step(records)
    restored.meta_step(records)  # resumes with the same Adam moments, normaliser statistics and draws
    original, resumed = editor.state_dict(), restored.state_dict()
    assert original.keys() == resumed.keys()
    assert all(torch.equal(original[key], resumed[key]) for key in original)
    with pytest.raises(ValueError, match="does not fit"):
        MalmenEditor(model, tokenizer, settings(rank=4)).load_state_dict(original)
    with pytest.raises(ValueError, match="unexpected keys"):
        editor.load_state_dict({"weights": torch.zeros(1)})


def test_prefix_cache_gives_the_same_deltas_and_gradients(model, tokenizer):
    records, before = make_records(6), snapshot(model)
    results = []
    for prefix in (0, 1):
        editor = MalmenEditor(model, tokenizer, settings(modules={"layers": [-1]}, prefix_layers=prefix))
        perturb(editor)
        deltas = editor.compute_deltas(records)
        stats = editor.meta_backward(records)
        results.append((deltas, grads_of(editor), stats))
    (full, full_grads, full_stats), (cached, cached_grads, cached_stats) = results
    torch.testing.assert_close(cached["model.layers.1.mlp.down_proj"], full["model.layers.1.mlp.down_proj"], rtol=1e-4, atol=1e-6)
    for name in full_grads:
        assert relative(cached_grads[name], full_grads[name]) < 1e-3, name
    assert cached_stats["loss"] == pytest.approx(full_stats["loss"], rel=1e-4)
    assert_unchanged(model, before)


def test_preserved_keys_are_the_answer_keys_moment_and_move_less(model, tokenizer):
    """fit_preservation stores E[kkᵀ] of the keys `cache` sees for those pairs; with μ > 0 their values move less."""
    edits = make_records(6)
    kept = make_records(6, offset=30)
    prompts, answers = [r["locality"][0]["prompt"] for r in kept], [r["locality"][0]["answer"] for r in kept]
    editor = MalmenEditor(model, tokenizer, settings())
    perturb(editor)
    count = editor.fit_preservation(prompts, answers)
    preserved_keys = {name: keys for name, (keys, _) in editor.cache([{"prompt": p, "target_new": a} for p, a in zip(prompts, answers, strict=True)]).items()}
    for name, keys in preserved_keys.items():
        assert keys.shape[0] == count
        torch.testing.assert_close(editor.preserved[name], keys.T @ keys / count, rtol=1e-5, atol=1e-6)
    moved = {}
    for mu in (0.0, 1e4):
        editor.settings.preserve_weight = mu
        deltas = editor.compute_deltas(edits)
        moved[mu] = sum(float((keys @ deltas[name].T).norm()) for name, keys in preserved_keys.items())
    assert moved[1e4] < 0.1 * moved[0.0]
    restored = MalmenEditor(model, tokenizer, settings(preserve_weight=1e4))
    restored.load_state_dict(editor.state_dict())
    assert all(torch.equal(restored.compute_deltas(edits)[name], deltas[name]) for name in deltas)
    with pytest.raises(ValueError, match="fit_preservation"):
        MalmenEditor(model, tokenizer, settings(preserve_weight=1.0)).compute_deltas(edits)


def test_text_keys_are_every_positions_moment_and_add_to_the_prior(model, tokenizer):
    """fit_text_preservation stores E[ttᵀ] over every position predicting a next token of each text (a hook on
    one text at a time gives the same); μₜ adds to the prior, saved and restored with the editor."""
    texts = TINY_CORPUS[:5]
    editor = MalmenEditor(model, tokenizer, settings())
    perturb(editor)
    count = editor.fit_text_preservation(texts)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in editor.modules}
    handles = [module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(args[0][0, :-1]))
               for name, module in editor.modules.items()]
    try:
        with torch.no_grad():
            for text in texts:
                model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        for handle in handles:
            handle.remove()
    for name, keys in seen.items():
        keys = torch.cat(keys).double()
        assert keys.shape[0] == count
        torch.testing.assert_close(editor.preserved_text[name], (keys.T @ keys / count).float(), rtol=1e-4, atol=1e-6)
    edits = make_records(4)
    kept = make_records(4, offset=30)
    editor.fit_preservation([r["locality"][0]["prompt"] for r in kept], [r["locality"][0]["answer"] for r in kept])
    editor.settings.preserve_weight, editor.settings.preserve_text_weight = 2.0, 3.0
    name = next(iter(editor.modules))
    expected = 2.0 * editor.preserved[name] + 3.0 * editor.preserved_text[name]
    torch.testing.assert_close(editor.preservation_prior(name, 50), expected)
    # In edit-key units the same weights are per edit key: the prior grows with the keys of the solve.
    editor.settings.preserve_units = "edit_keys"
    torch.testing.assert_close(editor.preservation_prior(name, 50), 50 * expected)
    editor.settings.preserve_units = "rows"
    moved = {}
    for mu in (0.0, 1e4):
        editor.settings.preserve_text_weight = mu
        deltas = editor.compute_deltas(edits)
        moved[mu] = sum(float((torch.cat(seen[n]) @ deltas[n].T).norm()) for n in deltas)
    assert moved[1e4] < 0.2 * moved[0.0]
    restored = MalmenEditor(model, tokenizer, settings(preserve_weight=2.0, preserve_text_weight=1e4))
    restored.load_state_dict(editor.state_dict())
    assert all(torch.equal(restored.compute_deltas(edits)[n], deltas[n]) for n in deltas)
    with pytest.raises(ValueError, match="fit_text_preservation"):
        MalmenEditor(model, tokenizer, settings(preserve_text_weight=1.0)).compute_deltas(edits)


def test_settings_are_checked(model, tokenizer):
    with pytest.raises(ValueError, match="would bypass edited layer 0"):
        MalmenEditor(model, tokenizer, settings(prefix_layers=1))
    with pytest.raises(ValueError, match="rank 1920 exceeds"):
        MalmenEditor(model, tokenizer, {"modules": {"layers": [-1]}})
    editor = MalmenEditor(model, tokenizer, settings(retention_coef=0.1))
    with pytest.raises(ValueError, match="needs `general` texts"):
        editor.meta_step(make_records(2))


def test_rounds_solve_again_on_the_edited_model(model, tokenizer):
    records = make_records(6)
    before = snapshot(model)
    single = MalmenEditor(model, tokenizer, settings(batch_size=4, lr_init=1.0))
    perturb(single)
    first = single.compute_deltas(records)
    with EditSet({name: 0.5 * delta for name, delta in first.items()}).apply(model):
        second = single.compute_deltas(records)
    rounds = MalmenEditor(model, tokenizer, settings(batch_size=4, lr_init=1.0, rounds=2, round_step=0.5))
    rounds.load_state_dict(single.state_dict())
    combined = rounds.compute_deltas(records)
    assert_unchanged(model, before)
    for name, delta in combined.items():
        torch.testing.assert_close(delta, 0.5 * first[name] + 0.5 * second[name], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(second[name], first[name], rtol=1e-2)  # the second round saw the edited model

    def edit_nll(deltas):
        encoded = encode_pairs(tokenizer, [r["prompt"] for r in records], [r["target_new"] for r in records])
        batch = batches(encoded, len(encoded), "cpu")[0]
        with EditSet(deltas).apply(model), torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(_answer_nll(logits, batch["labels"]))

    half = {name: 0.5 * delta for name, delta in first.items()}
    assert edit_nll(combined) < edit_nll(half) < edit_nll({})


def test_an_untrained_malmen_is_the_identity_network_and_is_asked_for_explicitly(model, tokenizer):
    from trustray.core.editing.factory import build_editor

    with pytest.raises(ValueError, match="meta-learned"):
        build_editor("malmen", model, tokenizer, "tiny", settings=settings())
    with pytest.raises(ValueError, match="no editor_dir"):
        build_editor("malmen", model, tokenizer, "tiny", editor_dir="somewhere", settings=settings(), untrained=True)
    editor = build_editor("malmen", model, tokenizer, "tiny", settings=settings(lr_init=0.5), untrained=True)
    records = make_records(3)
    # The identity network asks each answer token for d = −η (k·k) g, and the ridge solve combines them.
    for name, (keys, grads) in editor.cache(records).items():
        net, layer = editor.hypernet(name)
        torch.testing.assert_close(net.value_diffs(keys, grads, layer), -0.5 * (keys * keys).sum(-1, keepdim=True) * grads)


def test_subject_keys_are_one_per_edit_at_the_subjects_last_token(model, tokenizer):
    from trustray.core.editing.memit import PromptPositions

    records = [{**record, "subject": f"thing {i}"} for i, record in enumerate(make_records(3))]
    with pytest.raises(ValueError, match="below the last"):  # its subject position cannot reach the answer
        MalmenEditor(model, tokenizer, settings(key_position="subject"))
    editor = MalmenEditor(model, tokenizer, settings(key_position="subject", modules={"layers": [0]}))
    cached = editor.cache(records)
    top = "model.layers.0.mlp.down_proj"
    keys, grads = cached[top]
    assert all(k.shape[0] == len(records) for k, _ in cached.values())
    # Each row is the key at the subject's last token and the answer NLL's gradient with respect to the layer's
    # output there (through attention from the answer positions), checked one record at a time.
    for row, record in enumerate(records):
        position = PromptPositions(tokenizer, record["prompt"]).subject_last(record["subject"])
        example = answer_examples(tokenizer, [record["prompt"]], [record["target_new"]], 128)[0]
        seen = {}

        def hook(module, args, output, seen=seen, position=position):
            seen["key"] = args[0][0, position].detach()
            output.retain_grad()
            seen["output"] = output
            return output

        handle = model.get_submodule(top).register_forward_hook(hook)
        try:
            [batch] = batches([example], 1, "cpu")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            (_answer_nll(logits, batch["labels"]) / editor.settings.batch_size).backward()
        finally:
            handle.remove()
        torch.testing.assert_close(keys[row], seen["key"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[row], seen["output"].grad[0, position], rtol=1e-4, atol=1e-8)
        model.zero_grad(set_to_none=True)
    assert grads.abs().sum() > 0
    deltas = editor.compute_deltas(records)
    assert all(torch.isfinite(delta).all() for delta in deltas.values())
    with pytest.raises(ValueError, match="subject"):
        editor.cache(make_records(1))
