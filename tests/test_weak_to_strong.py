"""The weak-to-strong pipeline on the tiny model: every task kind and loss end to end, in process and on Ray Train,
a rerun that computes nothing, settings a rerun must agree on, and the bundled tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trustray.artifacts import ArtifactMismatchError
from trustray.config import load_config
from trustray.core.align.features import response_features, response_features_at
from trustray.data.w2s_tasks import load_classification_task, topics_task, verification_task
from trustray.models.loading import load_causal_lm, load_tokenizer
from trustray.pipelines.weak_to_strong import WeakToStrongConfig, run, table

TINY = "configs/weak_to_strong/tiny.yaml"


def tiny_config(model: str, out, *overrides: str) -> WeakToStrongConfig:
    return load_config(WeakToStrongConfig, TINY, [f"model={model}", f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w2s") / "run"
    config = tiny_config(tiny_llama_dir, out)
    return config, run(config)


def test_every_task_kind_loss_and_seed_gets_a_row_with_its_pgr(finished_run):
    config, results_path = finished_run
    results = json.loads(results_path.read_text())
    rows = results["rows"]
    expected = {(task, kind, loss, seed)
                for task, kinds in (("verification", ["classification"]), ("topics", ["classification"]),
                                    ("factual", ["reward_model", "generation"]))
                for kind in kinds for loss in config.losses for seed in config.seeds}
    assert {(r["task"], r["kind"], r["loss"], r["seed"]) for r in rows} == expected
    for entry in rows:
        if entry["kind"] != "generation":
            assert all(0.0 <= entry[key] <= 1.0 for key in ("weak", "ceiling", "student"))
        gap = entry["ceiling"] - entry["weak"]
        if gap > 0:
            assert entry["pgr"] == pytest.approx((entry["student"] - entry["weak"]) / gap)
        else:
            assert entry["pgr"] is None
    generation = [r for r in rows if r["kind"] == "generation"]
    # Best-of-n picks one of the prompt's answers: between a random answer's gold reward... and the best one's.
    assert all(r["weak"] <= r["best_answer"] + 1e-9 and r["student"] <= r["best_answer"] + 1e-9 for r in generation)
    summary = {(s["task"], s["kind"], s["loss"]): s for s in results["summary"]}
    assert len(summary) == len(expected) // len(config.seeds)
    verification = [r for r in rows if r["task"] == "verification" and r["loss"] == "xent"]
    assert summary[("verification", "classification", "xent")]["weak"]["mean"] == pytest.approx(
        sum(r["weak"] for r in verification) / len(verification))
    assert results["machine"] and "PGR" in table(results_path)


def test_students_of_one_seed_share_the_weak_labels_and_differ_by_loss(finished_run):
    config, results_path = finished_run
    out = results_path.parent
    import numpy as np

    weak = np.load(out / "verification" / "seed-0" / "weak" / "predictions.npz")
    assert weak["half2"].shape == (12, 2) and np.allclose(weak["half2"].sum(axis=1), 1.0)
    students = {loss: np.load(out / "verification" / "seed-0" / f"student-{loss}" / "predictions.npz")["test"]
                for loss in config.losses}
    assert not np.allclose(students["xent"], students["product"])


def test_a_rerun_trains_nothing_and_other_settings_are_refused(finished_run, tiny_llama_dir):
    config, results_path = finished_run
    out = results_path.parent
    marks = {path: path.stat().st_mtime_ns for path in out.rglob("predictions.npz")}
    assert len(marks) == 3 * len(config.seeds) * (2 + len(config.losses))  # every weak, ceiling and student unit
    # A lost score is recomputed from the finished checkpoint, without training again.
    lost = out / "topics" / "seed-1" / "ceiling" / "predictions.npz"
    before = lost.read_bytes()
    lost.unlink()
    run(config)
    assert lost.read_bytes() == before
    assert all(path.stat().st_mtime_ns == mark for path, mark in marks.items() if path != lost)
    with pytest.raises(ArtifactMismatchError, match="strong_trainable_layers"):
        run(tiny_config(tiny_llama_dir, out, "strong_trainable_layers=2"))


def test_a_loss_added_later_trains_only_its_students_on_ray_train(tiny_llama_dir, tmp_path, ray_local):
    task = "classification=[{name: topics, train: 16, test: 8, max_tokens: 8, weak: {kind: tfidf}}]"
    first = tiny_config(tiny_llama_dir, tmp_path / "run", "seeds=[0]", "losses=[xent]", "reward=[]", task)
    run(first)
    seed_dir = tmp_path / "run" / "topics" / "seed-0"
    kept = {path: path.stat().st_mtime_ns for path in seed_dir.rglob("predictions.npz")}
    more = tiny_config(tiny_llama_dir, tmp_path / "run", "resources.in_process=false", "seeds=[0]",
                       "losses=[xent, logconf]", "reward=[]", task)
    results = json.loads(run(more).read_text())
    assert [(r["task"], r["loss"]) for r in results["rows"]] == [("topics", "xent"), ("topics", "logconf")]
    assert all(path.stat().st_mtime_ns == mark for path, mark in kept.items())
    student = seed_dir / "student-logconf"
    assert (student / "ray_train").is_dir() and list((student / "checkpoints").glob("step-*/step.json"))
    assert not (seed_dir / "ceiling" / "ray_train").exists()


def test_a_sentence_embedding_weak_supervisor(tiny_llama_dir, tiny_embedder_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, tmp_path / "run", "seeds=[0]", "losses=[xent]", "reward=[]",
                         "classification=[{name: verification, train: 16, test: 8, max_tokens: 8, "
                         f"weak: {{kind: embedding, embedder: '{tiny_embedder_dir}'}}}}]")
    results = json.loads(run(config).read_text())
    assert [(r["task"], r["loss"]) for r in results["rows"]] == [("verification", "xent")]
    inputs = tmp_path / "run" / "verification" / "inputs"
    assert torch.load(inputs / "embedding.pt", weights_only=True).shape[0] == 24
    assert json.loads((inputs / "metadata.json").read_text())["task"]["weak"]["embedder"] == tiny_embedder_dir


@pytest.mark.parametrize("override, message", [
    ("losses=[hinge]", "losses must be distinct"),
    ("loss_settings={logconf: {strength: 1.0}}", "strength"),
    ("classification=[{name: verification, train: 8, test: 4, weak: {kind: lm, layers: 1, trainable_layers: 2}}]",
     "exceeds weak.layers"),
    ("reward=[{name: factual}, {name: factual}]", "each task once"),
])
def test_bad_settings_fail_before_any_work(tiny_llama_dir, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tiny_llama_dir, tmp_path, override)


def test_weak_layers_must_be_below_the_models_depth(tiny_llama_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, tmp_path, "classification=[]", "reward=[{name: factual, weak_layers: 2}]")
    with pytest.raises(ValueError, match="weak_layers"):
        run(config)


def test_verification_pairs_each_question_with_its_true_or_a_same_relation_answer():
    task = verification_task(train=400, test=100, seed=0)
    assert len(task.train) == 400 and len(task.test) == 100
    assert 0.4 < task.class_balance()[1] < 0.6
    assert not {e.id for e in task.train} & {e.id for e in task.test}
    assert all(e.text.startswith("Question: ") and "\nProposed answer: " in e.text for e in task.train)
    assert verification_task(train=400, test=100, seed=0) == task


def test_topics_are_balanced_and_refuse_uncategorized():
    task = topics_task(train=200, test=50, seed=1, max_words=10)
    assert task.classes == ("Physical sciences", "Technology")
    assert all(len(e.text.split()) <= 10 for e in task.train)
    with pytest.raises(ValueError, match="Uncategorized"):
        topics_task(train=10, test=5, topics=["Uncategorized", "Technology"])
    with pytest.raises(ValueError, match="examples"):
        load_classification_task("topics", train=5000, test=10)


def test_features_after_a_layer_come_from_one_pass_and_match_the_final_features(tiny_llama_dir):
    model = load_causal_lm(tiny_llama_dir, "cpu", "float32")
    tokenizer = load_tokenizer(tiny_llama_dir)
    prompts = [[{"role": "user", "content": "capital of France?"}], [{"role": "user", "content": "Rome?"}]]
    answers = ["Paris is the capital.", "Rome was founded on seven hills."]
    both = response_features_at(model, tokenizer, prompts, answers, [1, 2], pooling="mean")
    torch.testing.assert_close(both[2], response_features(model, tokenizer, prompts, answers, pooling="mean"))
    assert not torch.allclose(both[1], both[2]) and not math.isnan(float(both[1].sum()))
