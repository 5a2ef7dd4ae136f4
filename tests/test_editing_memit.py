"""MEMIT on the tiny Llama: the model is never changed, the closed form writes the target at the key, preserved keys move less the more they weigh, and the key position is the subject's last token (or a logged
guess when the prompt has no subject)."""

from __future__ import annotations

import pytest
import torch

from trustray.core.editing.factory import EDITORS, build_editor
from trustray.core.editing.memit import MemitEditor, PromptPositions
from trustray.models.tiny import TINY_CORPUS

torch.set_num_threads(1)

RECORDS = [
    {"prompt": "What is the colour of the tower?", "subject": "the tower", "target_new": "bright purple"},
    {"prompt": "Where does the old river flow?", "subject": "the old river", "target_new": "north to the sea"},
]
CHATS = [{"prompt": f"Where is the {thing}?", "answer": place}
         for thing in ("hill", "bridge", "market", "castle") for place in ("east", "west")]
# The tiny Llama's activations are small: a light covariance weight and a long target optimisation.
SETTINGS = {"modules": {"layers": [0]}, "covariance_weight": 1.0, "general_text": TINY_CORPUS[:20],
            "preserved_chats": CHATS, "target_steps": 200, "target_lr": 0.5, "target_stop_nll": 0.05,
            "target_clamp": 1e4, "target_weight_decay": 0.0, "learn_end_of_turn": True}


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_registered_and_refuses_to_run_without_preserved_keys(loaded):
    model, tokenizer = loaded
    assert EDITORS["memit"] is MemitEditor
    with pytest.raises(ValueError, match="preserved keys"):
        build_editor("memit", model, tokenizer, "tiny", settings={"modules": {"layers": [0]}})
    with pytest.raises(ValueError, match="below the last decoder layer"):
        build_editor("memit", model, tokenizer, "tiny", settings={**SETTINGS, "modules": {"layers": [-1]}})


def test_the_model_is_left_alone_and_unreached_targets_are_logged(loaded, caplog):
    """Whether an edit lands is measured on the embedded default (tests/test_served_edits_real.py): one random
    tiny layer below the answer cannot route a subject's state to the answer position."""
    model, tokenizer = loaded
    before = {key: value.clone() for key, value in model.state_dict().items()}
    editor = build_editor("memit", model, tokenizer, "tiny", settings={**SETTINGS, "target_steps": 3})
    with caplog.at_level("WARNING", logger="trustray.core.editing.memit"):
        deltas = editor.compute_deltas(RECORDS)
    assert sorted(deltas) == ["model.layers.0.mlp.down_proj"]
    assert deltas["model.layers.0.mlp.down_proj"].shape == model.model.layers[0].mlp.down_proj.weight.shape
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert "2 of 2 targets still have an answer NLL above" in caplog.text


def test_one_layer_with_a_light_covariance_writes_the_target_at_the_key(loaded):
    """With one edited layer and λ → 0, ΔW k = z − h exactly (the minimum-norm interpolation of the keys)."""
    model, tokenizer = loaded
    editor = build_editor("memit", model, tokenizer, "tiny", settings={**SETTINGS, "covariance_weight": 1e-6})
    prompts = [PromptPositions(tokenizer, r["prompt"]) for r in RECORDS]
    positions = editor.key_positions(prompts, [r["subject"] for r in RECORDS])
    targets = editor.targets(RECORDS, positions)
    deltas = editor.compute_deltas(RECORDS)
    _, hidden = editor.hidden_at(prompts, positions, deltas)
    _, unedited = editor.hidden_at(prompts, positions, {})
    assert (unedited - targets).norm() > 1.0
    torch.testing.assert_close(hidden, targets, atol=1e-3, rtol=1e-3)


def test_preserved_keys_move_less_the_more_they_weigh(loaded):
    model, tokenizer = loaded
    moved = []
    for weight in (0.01, 1.0, 100.0):
        editor = build_editor("memit", model, tokenizer, "tiny", settings={**SETTINGS, "covariance_weight": weight})
        deltas = editor.compute_deltas(RECORDS)
        moments = editor.moments()
        # Mean squared change of the preserved keys' values: tr(ΔW C ΔWᵀ), summed over the layers.
        moved.append(sum(float(torch.trace(d.double() @ moments[name] @ d.double().T)) for name, d in deltas.items()))
    assert moved[0] > moved[1] > moved[2]


def test_the_key_is_the_subjects_last_token_or_a_logged_guess(loaded, caplog):
    model, tokenizer = loaded
    editor = build_editor("memit", model, tokenizer, "tiny", settings=SETTINGS)
    prompt = PromptPositions(tokenizer, "What is the colour of the tower?")
    position = prompt.subject_last("the tower")
    subject_end = prompt.user_start + prompt.prompt.index("the tower") + len("the tower")
    assert prompt.offsets[position][1] == subject_end  # the token that ends the subject
    assert prompt.subject_last("the moon") is None
    with caplog.at_level("INFO", logger="trustray.core.editing.memit"):
        guessed = editor.key_positions([prompt, prompt], ["the tower", ""])
    assert guessed[0] == position and editor.guessed_keys == 1
    assert guessed[1] in prompt.tokens_within(0, len(prompt.prompt))
    assert "1 of 2 records had no subject" in caplog.text


def test_a_guessed_key_lies_between_the_last_name_and_the_end_never_on_punctuation(loaded):
    """"What is the capital of France?" must not be keyed at " of", which every "capital of X" shares."""
    _, tokenizer = loaded

    def window_text(prompt: str) -> list[str]:
        positions = PromptPositions(tokenizer, prompt)
        return [positions.prompt[positions.offsets[t][0] - positions.user_start:
                                 positions.offsets[t][1] - positions.user_start] for t in positions.guess_window()]

    def joined(prompt: str) -> str:
        return "".join(window_text(prompt)).replace(" ", "")

    assert joined("What is the capital of France?") == "France"
    assert joined("Which subject area does Vacuum cleaner belong to?") == "Vacuumcleanerbelongto"
    assert joined("where does the old river flow?") == "wheredoestheoldriverflow"


def test_preserved_chats_can_use_the_models_own_replies(loaded):
    from trustray.core.editing.locality import greedy_answers

    model, tokenizer = loaded
    given = build_editor("memit", model, tokenizer, "tiny", settings=SETTINGS)
    own = build_editor("memit", model, tokenizer, "tiny", settings={**SETTINGS, "preserve_own_replies": 4})
    prompts = [chat["prompt"] for chat in CHATS]
    assert given.preserved_conversations() == (prompts, [chat["answer"] for chat in CHATS])
    replies = greedy_answers(model, tokenizer, prompts, 4)
    assert own.preserved_conversations() == (prompts, [r.strip() or c["answer"] for r, c in zip(replies, CHATS, strict=True)])
    # The random tiny Llama replies with blank lines only: each preserved chat keeps its given answer then.
    assert all(not reply.strip() for reply in replies)


def test_the_statistics_pass_stops_above_the_edited_layers_and_matches_a_full_pass(loaded):
    from trustray.core.editing.memit import _token_batch
    from trustray.core.editing.tracing import KeyMoments

    model, tokenizer = loaded
    editor = build_editor("memit", model, tokenizer, "tiny", settings=SETTINGS)
    above = []
    handle = model.model.layers[1].register_forward_hook(lambda *args: above.append(1))
    try:
        moments = editor.moments()
    finally:
        handle.remove()
    assert above == []  # the layer above the edited one never ran
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in editor.modules.items()}
    rows, count = editor._statistics_ids(), 0
    with KeyMoments(editor.modules, sums) as tracer, torch.no_grad():
        for start in range(0, len(rows), editor.settings.batch_size):
            batch = _token_batch(rows[start : start + editor.settings.batch_size], torch.device("cpu"))
            tracer.mask = batch["attention_mask"].bool()
            model(**batch)
            count += int(tracer.mask.sum())
    for name, total in sums.items():
        torch.testing.assert_close(moments[name], total / count)


def test_targets_resume_from_a_work_cache_and_match_a_fresh_search(loaded, tmp_path):
    """A search stopped after some records resumes with only the others, and its targets are those of a search
    run in one go and in one batch (each record's δ is its own); a change of the search's settings is another
    key (the batch size is not one)."""
    from trustray.artifacts import TensorFiles

    model, tokenizer = loaded
    settings = {**SETTINGS, "target_steps": 5, "batch_size": 1}
    records = RECORDS + [{"prompt": "Who guards the hill?", "subject": "the hill", "target_new": "an old dog"}]
    one_batch = build_editor("memit", model, tokenizer, "tiny", settings={**settings, "batch_size": 16})
    prompts = [PromptPositions(tokenizer, r["prompt"]) for r in records]
    positions = one_batch.key_positions(prompts, [r["subject"] for r in records])
    fresh = one_batch.targets(records, positions)
    assert one_batch.reused_seconds == 0.0
    editor = build_editor("memit", model, tokenizer, "tiny", settings=settings)

    cache = TensorFiles(tmp_path / "work")
    editor.work_cache = cache
    editor.targets(records[:2], positions[:2])  # the search that stopped after two records
    assert len(cache) == 2
    resumed = editor.targets(records, positions)
    assert len(cache) == 3
    stored = [cache[editor.target_key(r, p)]["seconds"] for r, p in zip(records[:2], positions[:2], strict=True)]
    assert editor.reused_seconds == pytest.approx(sum(stored)) and editor.reused_seconds > 0
    torch.testing.assert_close(resumed, fresh)

    assert one_batch.target_key(records[0], positions[0]) == editor.target_key(records[0], positions[0])
    other = build_editor("memit", model, tokenizer, "tiny", settings={**settings, "target_lr": 0.2})
    assert other.target_key(records[0], positions[0]) != editor.target_key(records[0], positions[0])
    with pytest.raises(KeyError, match="file-name safe"):
        cache["../outside"] = {}


def test_parts_worked_on_apart_give_the_edit_of_one_process(loaded, tmp_path):
    """Records split at a multiple of the batch size and searched by separate editors into one cache: the edit
    then searches nothing and equals the edit of one editor that did all the work itself."""
    from trustray.artifacts import TensorFiles

    model, tokenizer = loaded
    settings = {**SETTINGS, "target_steps": 5, "batch_size": 2}
    records = RECORDS + [{"prompt": "Who guards the hill?", "subject": "the hill", "target_new": "an old dog"}]
    alone = build_editor("memit", model, tokenizer, "tiny", settings=settings).compute_deltas(records)
    cache = TensorFiles(tmp_path / "work")
    for part in (records[:2], records[2:]):
        worker = build_editor("memit", model, tokenizer, "tiny", settings=settings)
        worker.work_cache = cache
        worker.do_work(part)
    assert len(cache) == 3
    solver = build_editor("memit", model, tokenizer, "tiny", settings=settings)
    solver.work_cache = cache
    shared = solver.compute_deltas(records)
    assert solver.reused_seconds > 0
    assert shared.keys() == alone.keys()
    for name, delta in alone.items():
        torch.testing.assert_close(shared[name], delta)
    with pytest.raises(ValueError, match="work_cache"):
        build_editor("memit", model, tokenizer, "tiny", settings=settings).do_work(records)
    with pytest.raises(ValueError, match="no per-record work"):
        build_editor("ft", model, tokenizer, "tiny", settings={"modules": {"layers": [0]}}).do_work(records)
