"""Instruction pool from the bundled Wikipedia intros, and users' own chat-format datasets."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trustray.data.instructions import (
    PROMPT_TEMPLATES,
    build_instruction_pool,
    load_instruction_dataset,
    truncate_text,
)
from trustray.data.io import write_jsonl


@pytest.fixture(scope="module")
def built():
    return build_instruction_pool(300, 3, seed=11, max_chars=200)


def test_pool_is_deterministic_per_seed(built):
    again = build_instruction_pool(300, 3, seed=11, max_chars=200)
    assert again == built
    other = build_instruction_pool(300, 3, seed=12, max_chars=200)
    assert [r["id"] for r in other[0]] != [r["id"] for r in built[0]]


def test_targets_are_disjoint_from_pool_and_cover_every_topic(built):
    pool, targets = built
    assert len(pool) == 300 and len({r["id"] for r in pool}) == 300
    pool_sources = {r["source_id"] for r in pool}
    assert not pool_sources & {t["source_id"] for t in targets}
    topics = sorted({t["task"] for t in targets})
    assert len(topics) == 12
    assert [t["task"] for t in targets] == sorted(t["task"] for t in targets)  # grouped per topic
    assert all(sum(t["task"] == topic for t in targets) == 3 for topic in topics)
    assert all(t["task"] == t["topic"] for t in targets)


def test_message_format(built):
    pool, targets = built
    prompts = set()
    for row in pool + targets:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"] and 0 < len(assistant["content"]) <= 200
        prompts.add(next(t for t in PROMPT_TEMPLATES if t.split("{")[0] in user["content"]))
    assert len(prompts) > 2  # templates vary


def test_topic_subset_and_errors():
    pool, targets = build_instruction_pool(20, 2, seed=0, topics=["Mathematics", "Arts"])
    assert {r["topic"] for r in pool} <= {"Mathematics", "Arts"}
    assert [t["task"] for t in targets] == ["Arts", "Arts", "Mathematics", "Mathematics"]
    with pytest.raises(ValueError, match="unknown topics"):
        build_instruction_pool(5, 1, seed=0, topics=["Cooking"])
    with pytest.raises(ValueError, match="exceeds"):
        build_instruction_pool(10_000, 1, seed=0, topics=["Mathematics"])


def test_truncate_text_cuts_at_word_boundary():
    assert truncate_text("alpha beta gamma", 12) == "alpha beta"
    assert truncate_text("short", 100) == "short"
    assert truncate_text("unbroken", 4) == "unbr"


def _chat(i: int) -> dict:
    return {
        "id": f"u{i}",
        "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
        "source": "mine",
    }


def test_user_jsonl_and_parquet_load(tmp_path):
    rows = [_chat(i) for i in range(3)]
    jsonl = write_jsonl(rows, tmp_path / "pool.jsonl")
    assert load_instruction_dataset(jsonl) == rows
    parquet = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert load_instruction_dataset(parquet, limit=2) == rows[:2]
    assert len(load_instruction_dataset("wiki", n_train=5, n_target_per_topic=1)) == 5


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": _chat(0)["messages"]}, "lacks an `id`"),
        ({"id": "x", "messages": []}, "non-empty list"),
        (
            {"id": "x", "messages": [{"role": "user"}]},
            "message 0 must be an object with `role` and `content`",
        ),
        ({"id": "x", "messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'"),
        ({"id": "x", "messages": [{"role": "assistant", "content": 3}]}, "content must be a string"),
        (
            {"id": "x", "messages": [{"role": "user", "content": "hi"}]},
            "last message must be a non-empty assistant",
        ),
    ],
)
def test_invalid_rows_are_rejected_with_clear_errors(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_chat(1)) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="row 1") as caught:
        load_instruction_dataset(path)
    assert message in str(caught.value)


def test_duplicate_ids_rejected(tmp_path):
    path = write_jsonl([_chat(1), _chat(1)], tmp_path / "dup.jsonl")
    with pytest.raises(ValueError, match="duplicate id"):
        load_instruction_dataset(path)


def test_hf_source_without_datasets_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the Hugging Face `datasets` package"):
        load_instruction_dataset("hf:some/dataset")
    with pytest.raises(ImportError, match="datasets"):
        load_instruction_dataset(tmp_path)
