"""`trustray eval rag` on tiny models: the pipeline runs on Ray and writes well-formed results."""

import json
from pathlib import Path

import pytest

from trustray.config import load_config
from trustray.pipelines import build_index, eval_rag

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_eval_rag_tiny_end_to_end(tmp_path, tiny_llama_dir, tiny_embedder_dir, ray_local, monkeypatch):
    index_dir = build_index.run(
        load_config(
            build_index.BuildIndexConfig,
            CONFIGS / "build_index/tiny.yaml",
            [f"output_dir={tmp_path / 'index'}", f"embedder.model={tiny_embedder_dir}"],
        )
    )
    output = tmp_path / "eval"
    summary = eval_rag.run(
        load_config(
            eval_rag.EvalRagConfig,
            CONFIGS / "eval_rag/tiny.yaml",
            [f"index_dir={index_dir}", f"embedder.model={tiny_embedder_dir}", f"chat.model={tiny_llama_dir}",
             f"output_dir={output}"],
        )
    )
    written = json.loads((output / eval_rag.SUMMARY_FILE).read_text())
    assert written["n_questions"] == 6 == summary["n_questions"]
    for mode in ("closed_book", "rag"):
        assert set(written[mode]) >= {"em", "f1", "contains"}
        assert all(0.0 <= written[mode][key] <= 1.0 for key in ("em", "f1", "contains"))
        assert written[mode]["p95_ms"] >= written[mode]["p50_ms"] > 0
        low, high = written[mode]["contains_ci"]
        assert low <= written[mode]["contains"] <= high
    assert written["reference"] == "rag" and written["closed_book"]["contains_minus_reference"]["mean"] == pytest.approx(
        written["closed_book"]["contains"] - written["rag"]["contains"])
    # Retrieved passages make the RAG prompt longer than the closed-book one.
    assert written["rag"]["tokens_in"] > written["closed_book"]["tokens_in"]
    rows = [json.loads(line) for line in (output / eval_rag.QUESTIONS_FILE).read_text().splitlines()]
    assert len(rows) == 6 and all(len(row["sources"]) == 2 for row in rows)
    assert "closed_book" in eval_rag.format_table(summary)

    # A rerun with the same settings (latency aside) answers nothing again: each condition's answers were kept.
    def no_more_answers(*args, **kwargs):
        raise AssertionError("a finished condition was answered again")

    with monkeypatch.context() as patched:
        patched.setattr(eval_rag, "answer_batch", no_more_answers)
        again = eval_rag.run(load_config(eval_rag.EvalRagConfig, CONFIGS / "eval_rag/tiny.yaml", [
            f"index_dir={index_dir}", f"embedder.model={tiny_embedder_dir}", f"chat.model={tiny_llama_dir}",
            f"output_dir={output}", "latency_questions=0"]))
    assert again["rag"]["contains"] == summary["rag"]["contains"] and again["rag"]["p50_ms"] is None

    # Compressors under a 24-token budget (the extractive one reading the top 3), uncompressed top 1 and top 2, and
    # the robustness run with 2 random passages mixed into each condition's passages.
    compressors = (f"compressors=[{{name: truncate, budget: 24}}, "
                   f"{{name: extractive, budget: 24, top_k: 3, embedder: {{model: {tiny_embedder_dir}}}}}]")
    summary = eval_rag.run(load_config(eval_rag.EvalRagConfig, CONFIGS / "eval_rag/tiny.yaml", [
        f"index_dir={index_dir}", f"embedder.model={tiny_embedder_dir}", f"chat.model={tiny_llama_dir}",
        f"output_dir={output}", "modes=[rag@1, rag]", "irrelevant=2", "latency_questions=2", compressors]))
    assert summary["conditions"] == ["rag@1", "rag", "truncate", "extractive"]
    assert summary["depths"] == {"rag@1": 1, "rag": 2, "truncate": 2, "extractive": 3}
    assert summary["reference"] == "rag@1" and "contains_minus_reference" in summary["extractive"]
    for condition in ("truncate", "extractive"):
        assert summary[condition]["tokens_in"] < summary["rag"]["tokens_in"]
        assert summary[condition]["context_kept"] < 1
    assert summary["rag@1"]["context_tokens"] < summary["rag"]["context_tokens"]
    rows = [json.loads(line) for line in (output / eval_rag.QUESTIONS_FILE).read_text().splitlines()]
    assert all(len(row["sources"]) == 3 for row in rows)  # the deepest condition's retrieval
    for row in rows:  # each condition's own top-k plus the same 2 irrelevant passages
        assert [len(row[c]["passage_ids"]) for c in ("rag@1", "rag", "truncate", "extractive")] == [3, 4, 4, 5]
        assert set(row["rag"]["passage_ids"]) == set(row["truncate"]["passage_ids"])
        assert row["truncate"]["context_tokens"] <= 24 and row["extractive"]["context_tokens"] <= 24


def test_translate_flags_become_one_override():
    assert eval_rag.translate_flags(["a=1", "--compressor", "truncate", "--compressor=extractive=/x/y"]) == [
        "a=1", "compressors=[{name: truncate}, {name: extractive, scorer_dir: '/x/y'}]"]
    assert eval_rag.translate_flags(["top_k=3"]) == ["top_k=3"]
    [override] = eval_rag.translate_flags(["--compressor", "abstractive=/s", "--compressor", "abstractive"])
    assert override == "compressors=[{name: abstractive, summarizer_dir: '/s'}, {name: abstractive}]"
    config = eval_rag.EvalRagConfig(compressors=[{"name": "abstractive", "summarizer_dir": "/s"}, {"name": "abstractive"}])
    assert [eval_rag.label(c) for c in config.compressors] == ["abstractive+distilled", "abstractive"]


def test_modes_and_reference_are_checked():
    with pytest.raises(ValueError, match="unknown mode"):
        eval_rag.EvalRagConfig(modes=["rag@0"])
    with pytest.raises(ValueError, match="unknown mode"):
        eval_rag.EvalRagConfig(modes=["closed_book@2"])
    with pytest.raises(ValueError, match="reference"):
        eval_rag.EvalRagConfig(modes=["rag"], reference="rag@1")
    config = eval_rag.EvalRagConfig(modes=["closed_book", "rag@5", "rag"], top_k=2,
                                    compressors=[{"name": "truncate", "top_k": 10}])
    assert eval_rag.depths(config) == {"closed_book": 0, "rag@5": 5, "rag": 2, "truncate": 10}
    assert eval_rag.reference_condition(config) == "rag"


def test_recall_counts_the_gold_page_among_the_top_k():
    from trustray.core.rag.index import Passage

    questions = [{"metadata": {"gold_doc_id": "a"}}, {"metadata": {"gold_doc_id": "b"}}]
    retrieved = [[Passage(f"{d}#0", "", "", 0.0) for d in "axcdefghij"], [Passage(f"{d}#1", "", "", 0.0) for d in "xybdefghij"]]
    assert eval_rag.recall_at(questions, retrieved) == {"recall@1": 0.5, "recall@3": 1.0, "recall@5": 1.0, "recall@10": 1.0}
    assert eval_rag.recall_at([{"metadata": {}}, *questions[1:]], retrieved) is None


def test_a_plan_the_cluster_cannot_place_is_refused(ray_local):
    """Every compressor actor lives as long as the chat actor: asking for more CPUs than exist fails at once."""
    import ray

    cpus = ray.cluster_resources()["CPU"]
    config = eval_rag.EvalRagConfig(compressors=[{"name": "truncate", "label": "a"}, {"name": "truncate", "label": "b"}],
                                    chat_resources={"num_cpus": cpus}, compressor_resources={"num_cpus": 0.5})
    with pytest.raises(ValueError, match="do not fit"):
        eval_rag.check_resources(config)
    eval_rag.check_resources(config.model_copy(update={"chat_resources": eval_rag.ActorResources(num_cpus=cpus - 1)}))
