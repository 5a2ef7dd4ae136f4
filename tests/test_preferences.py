"""Preference data: prompts from the packaged data (no edit test split, no FanOutQA evidence page), oracles whose
gold reward and label noise behave as documented, and TRL's preference format in and out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from trustray.data.cloze import evidence_titles
from trustray.data.edits import load_edit_split
from trustray.data.preferences import (
    FactualOracle,
    Oracle,
    PreferencePrompt,
    SentimentOracle,
    build_oracle,
    factual_prompts,
    labelled_row,
    load_prompts,
    read_preferences,
    sentiment_prompts,
    write_preferences,
)

CAPITAL = PreferencePrompt("p1", "factual", "What is the capital of France?", ("Paris",))


def test_factual_prompts_mix_edit_facts_and_cloze_questions_never_the_test_split():
    prompts = factual_prompts(40, seed=0)
    assert len(prompts) == 40 and len({p.id for p in prompts}) == 40
    facts = [p for p in prompts if p.id.startswith("fact-")]
    assert len(facts) == 20 and all(p.gold and p.topic for p in prompts)
    test_ids = {f"fact-{r['id']}" for r in load_edit_split("test")}
    assert not test_ids & {p.id for p in facts}
    assert factual_prompts(40, seed=0) == prompts and factual_prompts(40, seed=1) != prompts


def test_sentiment_prompts_continue_corpus_sentences_outside_fanoutqa_evidence():
    prompts = sentiment_prompts(12, seed=0)
    assert len({p.id for p in prompts}) == 12
    assert all(p.prompt.startswith("Continue this text in a positive tone: ") and not p.gold and p.topic
               for p in prompts)
    assert all(len(p.prompt.split(": ", 1)[1].split()) == 6 for p in prompts)
    assert evidence_titles()  # the exclusion list is not empty, so the check above means something
    with pytest.raises(ValueError, match="unknown preference task"):
        load_prompts("toxicity", 3)


def test_the_factual_gold_reward():
    oracle = FactualOracle()
    assert oracle.reward(CAPITAL, "Paris") == 1.0
    assert oracle.reward(CAPITAL, "The capital of France is Paris.") == 1.0
    assert oracle.reward(CAPITAL, "Lyon") == 0.0
    long_answer = "Paris, " + "which is a lovely city with many museums and parks " * 3
    assert 0.7 < oracle.reward(CAPITAL, long_answer) < 1.0
    with pytest.raises(ValueError, match="no gold answer"):
        oracle.reward(PreferencePrompt("s", "sentiment", "Continue: The"), "x")


def test_the_sentiment_gold_reward_is_vader():
    oracle = build_oracle("sentiment")
    assert isinstance(oracle, SentimentOracle)
    prompt = PreferencePrompt("s", "sentiment", "Continue this text in a positive tone: The film")
    assert oracle.reward(prompt, "was a wonderful, joyful surprise.") > 0.5
    assert oracle.reward(prompt, "was terrible and boring.") < -0.5


def test_deterministic_labels_ties_and_skips():
    oracle = FactualOracle()
    assert oracle.label(CAPITAL, "Paris", "Lyon") == "a"
    assert oracle.label(CAPITAL, "Lyon", "Paris") == "b"
    assert oracle.label(CAPITAL, "Lyon", "Marseille") == "tie"
    skipping = FactualOracle(skip_rate=0.5, seed=1)
    labels = [skipping.label(CAPITAL, f"Paris {i}", "Lyon") for i in range(400)]
    assert 0.4 < labels.count("skip") / 400 < 0.6 and set(labels) == {"a", "skip"}
    assert labels == [skipping.label(CAPITAL, f"Paris {i}", "Lyon") for i in range(400)]  # asked again: the same
    assert FactualOracle(tie_margin=0.5).label(CAPITAL, "Paris", "Paris is the capital " + "x " * 20) == "tie"
    with pytest.raises(ValueError, match="skip_rate"):
        FactualOracle(skip_rate=1.0)


@dataclass
class _NumberOracle(Oracle):
    """The gold reward is the number a response starts with: lets the test set reward gaps exactly."""

    task = "numbers"

    def reward(self, prompt: PreferencePrompt, response: str) -> float:
        return float(response.split()[0])


def test_noisy_labels_follow_bradley_terry():
    oracle = _NumberOracle(temperature=0.5, seed=3)
    labels = [oracle.label(CAPITAL, f"1.0 #{i}", f"0.5 #{i}") for i in range(4000)]
    expected = 1 / (1 + math.exp(-0.5 / 0.5))
    assert labels.count("a") / len(labels) == pytest.approx(expected, abs=0.025)
    assert _NumberOracle(seed=3).preference_probability(CAPITAL, "1", "1") == 0.5


def test_trl_format_round_trips_through_jsonl_and_parquet(tmp_path):
    rows = [labelled_row(CAPITAL, "Paris", "Lyon", "a", labeler="oracle"),
            labelled_row(CAPITAL, "Lyon", "Paris", "b")]
    assert labelled_row(CAPITAL, "Paris", "Paris.", "tie") is None
    assert rows[1]["chosen"] == [{"role": "assistant", "content": "Paris"}]
    for name in ("prefs.jsonl", "prefs.parquet"):
        write_preferences(rows, tmp_path / name)
        loaded = read_preferences(tmp_path / name)
        assert [row["chosen"] for row in loaded] == [row["chosen"] for row in rows]
        assert loaded[0]["prompt"] == [{"role": "user", "content": CAPITAL.prompt}]
        assert loaded[0]["labeler"] == "oracle" and loaded[0]["task"] == "factual"


def test_a_users_standard_form_file_is_read_and_malformed_rows_are_named(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}\n')
    row = read_preferences(path)[0]
    assert row["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert row["rejected"] == [{"role": "assistant", "content": "Go away."}]
    path.write_text('{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}\n{"prompt": "Hi?", "chosen": "x"}\n')
    with pytest.raises(ValueError, match="row 2: missing \\['rejected'\\]"):
        read_preferences(path)
    path.write_text('{"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}\n')
    with pytest.raises(ValueError, match="end with an assistant message"):
        read_preferences(path)
