"""The locality check of served edit sets: its arithmetic, greedy answers on a tiny model, the default probes and
anchors, and the worker giving default anchors to an editor held to locality."""

from __future__ import annotations

import pytest

from trustray.core.editing.locality import LocalityCheck, greedy_answers, kept_fraction, normalize_answer


def test_kept_fraction_compares_answers_after_normalising_whitespace():
    assert normalize_answer("  Paris\n is  nice ") == "Paris is nice"
    assert kept_fraction(["Paris", "Berlin", "Rome", "Madrid"], ["Paris ", "Lyon", " Rome", "Lyon"]) == 0.5
    with pytest.raises(ValueError):
        kept_fraction(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        kept_fraction([], [])


def test_the_check_takes_reference_answers_once_and_measures_the_current_ones():
    answers = {"q1": "a", "q2": "b", "q3": "c", "q4": "d"}
    calls = []

    def answer(questions):
        calls.append(list(questions))
        return [answers[question] for question in questions]

    check = LocalityCheck(answer, ["q1", "q2", "q3", "q4"])
    assert check.reference == ["a", "b", "c", "d"] and len(calls) == 1
    assert check.measure() == {"locality_kept": 1.0, "locality_probes": 4}
    answers["q2"] = "Lyon"
    assert check.measure() == {"locality_kept": 0.75, "locality_probes": 4}
    assert check.reference == ["a", "b", "c", "d"]
    with pytest.raises(ValueError):
        LocalityCheck(answer, [])


def test_greedy_answers_are_batched_without_changing_any_answer(tiny_llama_dir):
    from trustray.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_llama_dir, "cpu"), load_tokenizer(tiny_llama_dir)
    questions = ["Where is the river?", "What is the colour of the tower?", "Who wrote the long book about ships?"]
    batched = greedy_answers(model, tokenizer, questions, max_new_tokens=6, batch_size=3)
    alone = [greedy_answers(model, tokenizer, [question], max_new_tokens=6)[0] for question in questions]
    assert batched == alone and all(isinstance(answer, str) for answer in batched)


def test_default_probes_are_fixed_and_never_an_anchor_or_an_edited_subject():
    from trustray.data.edits import default_locality_anchors, load_edit_split, locality_probe_questions

    probes = locality_probe_questions(50)
    assert len(set(probes)) == 50 and probes == locality_probe_questions(50)
    anchors = default_locality_anchors(50)
    anchor_prompts = {anchor["prompt"] for anchor in anchors}
    assert anchors and not anchor_prompts & set(probes)
    train = load_edit_split("train")
    train_probes = {item["prompt"] for record in train for item in record["locality"]}
    assert anchor_prompts <= train_probes and set(probes) <= train_probes
    edited = {record["prompt"] for split in ("train", "dev", "test") for record in load_edit_split(split)}
    assert not (set(probes) | anchor_prompts) & edited


@pytest.mark.parametrize("editor, gets_anchors", [("ft", False), ("ft_kl", True)])
def test_only_an_editor_held_to_locality_gets_default_anchors(tiny_llama_dir, editor, gets_anchors):
    from trustray.actors.editor import EditSetMaker

    anchors = [{"prompt": f"Where is river {i}?", "answer": "north"} for i in range(3)]
    maker = EditSetMaker.load(tiny_llama_dir, "tiny", editor, editor_settings={"modules": {"layers": [-1]}},
                              device="cpu", default_anchors=anchors, anchors_per_edit=2)
    own = {"prompt": "What is the colour of the tower?", "target_new": "red",
           "locality": [{"prompt": "Where is the hill?", "answer": "east"}]}
    bare = [{"prompt": f"Question {i}?", "target_new": "red"} for i in range(2)]
    anchored = maker.anchored([own, *bare])
    assert anchored[0] == own
    if gets_anchors:
        assert [item["locality"] for item in anchored[1:]] == [anchors[0:2], [anchors[2], anchors[0]]]
    else:
        assert anchored[1:] == bare
