"""Knowledge-editing data: the bundled Wikipedia edit dataset and the zsRE / CounterFact loaders."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from trustray.data.edit_files import load_counterfact, load_zsre
from trustray.data.edits import (
    SPLITS,
    TEMPLATES,
    build_edit_dataset,
    load_edit_split,
)
from trustray.data.wiki_facts import edit_record_id

RECORD_KEYS = {
    "id",
    "subject",
    "relation",
    "prompt",
    "target_true",
    "target_new",
    "paraphrases",
    "locality",
    "split",
}
MINIMUM_SIZES = {"train": 5000, "dev": 500, "test": 1000}


@pytest.fixture(scope="module")
def dataset() -> dict[str, list[dict]]:
    return build_edit_dataset(seed=0)


@pytest.fixture(scope="module")
def records(dataset) -> list[dict]:
    return [record for split in SPLITS for record in dataset[split]]


def test_split_sizes_meet_the_minimums(dataset):
    assert set(dataset) == set(SPLITS)
    for split, minimum in MINIMUM_SIZES.items():
        assert len(dataset[split]) >= minimum, (split, len(dataset[split]))


def test_records_have_the_shared_shape_and_are_json(dataset, records):
    for split in SPLITS:
        assert all(record["split"] == split for record in dataset[split])
    for record in records:
        assert RECORD_KEYS <= set(record), sorted(RECORD_KEYS - set(record))
        assert record["relation"] in TEMPLATES
        assert record["subject"] in record["prompt"]
        assert record["target_true"].strip() and record["target_new"].strip()
    assert json.loads(json.dumps(dataset)) == dataset


def test_ids_are_unique_and_derived_from_subject_and_relation(records):
    assert len({record["id"] for record in records}) == len(records)
    assert all(record["id"] == edit_record_id(record["subject"], record["relation"]) for record in records)


def test_splits_are_disjoint_by_subject(dataset):
    subjects = {split: {record["subject"] for record in dataset[split]} for split in SPLITS}
    assert not subjects["train"] & subjects["dev"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["dev"] & subjects["test"]


def test_build_is_deterministic_and_the_seed_matters(dataset):
    assert build_edit_dataset(seed=0) == dataset
    other = build_edit_dataset(seed=1)
    assert {r["subject"] for r in other["test"]} != {r["subject"] for r in dataset["test"]}


def test_every_record_has_five_distinct_paraphrases(records):
    for record in records:
        paraphrases = record["paraphrases"]
        assert len(set(paraphrases)) >= 5 and len(set(paraphrases)) == len(paraphrases)
        assert record["prompt"] not in paraphrases
        assert all(record["subject"] in paraphrase for paraphrase in paraphrases)


def test_counterfactuals_are_other_answers_of_the_same_relation(records):
    answers: dict[str, set[str]] = defaultdict(set)
    for record in records:
        answers[record["relation"]].add(record["target_true"])
    for record in records:
        assert record["target_new"].casefold() != record["target_true"].casefold(), record
        assert record["target_new"] in answers[record["relation"]], record


def test_counterfactuals_are_not_partly_true(records):
    """No "German" for "German-American", no "South Asia" for "Central and South Asia"."""
    for record in records:
        new, true = (set(re.findall(r"\w+", record[key].casefold())) for key in ("target_new", "target_true"))
        assert not new <= true and not true <= new, record


def test_locality_prompts_are_about_other_never_edited_subjects(dataset, records):
    edited = {record["subject"] for record in records}
    same_relation = 0
    for record in records:
        locality = record["locality"]
        assert len(locality) == 3
        for item in locality:
            assert item["subject"] != record["subject"]
            assert item["subject"] not in edited  # the held-out pool: safe under batch editing
            assert item["subject"] in item["prompt"] and item["answer"].strip()
        same_relation += any(item["relation"] == record["relation"] for item in locality)
    assert same_relation / len(records) > 0.95


def test_specific_relations_are_well_represented(records):
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        counts[record["relation"]] += 1
    assert set(counts) == set(TEMPLATES)
    assert sum(n for relation, n in counts.items() if relation != "subject_area") > 0.4 * len(records)


def test_offtemplate_questions_share_no_template_or_subject_with_any_edit(records):
    from trustray.data.offtemplate import edit_template_patterns, load_offtemplate_questions

    questions = load_offtemplate_questions(fanoutqa=150, cloze=150)
    assert [q["source"] for q in questions].count("fanoutqa") == 150 and len(questions) == 300
    assert len({q["id"] for q in questions}) == 300 and all(q["prompt"] and q["answer"] for q in questions)
    assert load_offtemplate_questions(fanoutqa=150, cloze=150) == questions  # seeded
    edited_subjects = {record["subject"] for record in records} | {record["title"] for record in records}
    # No question is asked with an edit template, nor (cloze) about a page any record edits.
    patterns = edit_template_patterns()
    assert len(patterns) == 7 * len(TEMPLATES) and patterns[0].match("What is the nationality of Ann Lee?")
    assert not [q for q in questions if any(p.match(q["prompt"]) for p in patterns)]
    cloze_pages = [q["prompt"].removeprefix("About ").split(", fill in the blank")[0]
                   for q in questions if q["source"] == "cloze"]
    assert len(cloze_pages) == 150 and not set(cloze_pages) & edited_subjects
    with pytest.raises(ValueError, match="at least one"):
        load_offtemplate_questions(fanoutqa=0, cloze=0)


def test_load_edit_split_limits_and_copies():
    first = load_edit_split("dev", limit=5)
    assert len(first) == 5 and all(record["split"] == "dev" for record in first)
    first[0]["target_new"] = "changed"
    assert load_edit_split("dev", limit=5)[0]["target_new"] != "changed"
    assert len(load_edit_split("test")) >= MINIMUM_SIZES["test"]
    with pytest.raises(ValueError, match="unknown split"):
        load_edit_split("validation")
    with pytest.raises(ValueError, match="limit"):
        load_edit_split("train", limit=-1)


# --- users' files ------------------------------------------------------------------------------------------------

ZSRE_ROWS = [
    {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "pred": "Trinity College",
        "rephrase": "What university did Watts Humphrey take part in?",
        "alt": " University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
    },
    {
        "subject": "Ramalinaceae",
        "src": "Which family does Ramalinaceae belong to?",
        "rephrase": "What family are Ramalinaceae?",
        "alt": "Noctuidae",
        "answers": ["Lecanorales", "Lecanoromycetes"],
        "loc": "nq question: types of skiing in the winter olympics 2018",
        "loc_ans": "Downhill",
    },
]

COUNTERFACT_ROWS = [
    {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": [
            "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
            "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
        ],
        "neighborhood_prompts": [
            "The mother tongue of Léon Blum is",
            "The native language of Montesquieu is",
        ],
        "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
]


def write_json(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_load_zsre_maps_the_mend_format(tmp_path):
    records = load_zsre(write_json(tmp_path, "zsre_mend_eval.json", ZSRE_ROWS))
    assert len(records) == 2
    first = records[0]
    assert RECORD_KEYS <= set(first)
    assert first["id"] == "zsre-0" and first["relation"] == "zsre" and first["split"] == "test"
    assert first["prompt"] == "What university did Watts Humphrey attend?"
    assert first["target_true"] == "Illinois Institute of Technology"
    assert first["target_new"] == "University of Michigan"
    assert first["paraphrases"] == ["What university did Watts Humphrey take part in?"]
    assert first["locality"] == [
        {"prompt": "Who played desmond doss father in hacksaw ridge?", "answer": "Hugo Weaving"}
    ]
    train = load_zsre(write_json(tmp_path, "zsre_mend_train.json", ZSRE_ROWS), split="train")
    assert {record["split"] for record in train} == {"train"}
    with pytest.raises(ValueError, match="unknown split"):
        load_zsre(write_json(tmp_path, "zsre.json", ZSRE_ROWS), split="eval")


def test_load_zsre_names_the_record_and_key_of_a_malformed_file(tmp_path):
    rows = [dict(ZSRE_ROWS[0]), {key: value for key, value in ZSRE_ROWS[1].items() if key != "alt"}]
    with pytest.raises(ValueError, match=r"record 1 lacks required key 'alt'"):
        load_zsre(write_json(tmp_path, "broken.json", rows))
    with pytest.raises(ValueError, match=r"record 0: 'answers' must be a non-empty list"):
        load_zsre(write_json(tmp_path, "empty_answers.json", [dict(ZSRE_ROWS[0], answers=[])]))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_zsre(write_json(tmp_path, "object.json", {"data": ZSRE_ROWS}))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_zsre(bad_json)


def test_load_counterfact_maps_the_rome_format(tmp_path):
    (record,) = load_counterfact(write_json(tmp_path, "counterfact.json", COUNTERFACT_ROWS))
    assert RECORD_KEYS <= set(record)
    assert record["id"] == "counterfact-0"
    assert record["subject"] == "Danielle Darrieux" and record["relation"] == "P103"
    assert record["prompt"] == "The mother tongue of Danielle Darrieux is"
    assert (record["target_true"], record["target_new"]) == ("French", "English")
    assert record["paraphrases"] == COUNTERFACT_ROWS[0]["paraphrase_prompts"]
    assert record["locality"] == [
        {"prompt": "The mother tongue of Léon Blum is", "answer": "French"},
        {"prompt": "The native language of Montesquieu is", "answer": "French"},
    ]
    assert record["generation_prompts"] == ["Danielle Darrieux's mother tongue is"]


def test_load_counterfact_names_the_record_and_key_of_a_malformed_file(tmp_path):
    row = json.loads(json.dumps(COUNTERFACT_ROWS[0]))
    del row["requested_rewrite"]["target_new"]
    with pytest.raises(ValueError, match=r"record 1: requested_rewrite lacks required key 'target_new'"):
        load_counterfact(write_json(tmp_path, "broken.json", [COUNTERFACT_ROWS[0], row]))
    row = json.loads(json.dumps(COUNTERFACT_ROWS[0]))
    row["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    with pytest.raises(ValueError, match=r"record 0: requested_rewrite: 'prompt' must contain"):
        load_counterfact(write_json(tmp_path, "no_slot.json", [row]))
    with pytest.raises(ValueError, match=r"record 0 lacks required key 'neighborhood_prompts'"):
        row = {key: value for key, value in COUNTERFACT_ROWS[0].items() if key != "neighborhood_prompts"}
        load_counterfact(write_json(tmp_path, "no_neighbours.json", [row]))
    with pytest.raises(FileNotFoundError):
        load_counterfact(tmp_path / "missing.json")
