"""`trustray eval rag` on tiny models: the pipeline runs on Ray and writes well-formed results."""

import json
from pathlib import Path

import pytest

from trustray.config import load_config
from trustray.pipelines import build_index, eval_rag

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_eval_rag_tiny_end_to_end(tmp_path, tiny_llama_dir, tiny_embedder_dir, ray_local):
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
    # Retrieved passages make the RAG prompt longer than the closed-book one.
    assert written["rag"]["tokens_in"] > written["closed_book"]["tokens_in"]
    rows = [json.loads(line) for line in (output / eval_rag.QUESTIONS_FILE).read_text().splitlines()]
    assert len(rows) == 6 and all(len(row["sources"]) == 2 for row in rows)
    assert "closed_book" in eval_rag.format_table(summary)

    # Compressors under a 24-token budget, and the robustness run with 2 random passages mixed into the top 2.
    compressors = (f"compressors=[{{name: truncate, budget: 24}}, "
                   f"{{name: extractive, budget: 24, embedder: {{model: {tiny_embedder_dir}}}}}]")
    summary = eval_rag.run(load_config(eval_rag.EvalRagConfig, CONFIGS / "eval_rag/tiny.yaml", [
        f"index_dir={index_dir}", f"embedder.model={tiny_embedder_dir}", f"chat.model={tiny_llama_dir}",
        f"output_dir={output}", "modes=[rag]", "irrelevant=2", compressors]))
    assert summary["conditions"] == ["rag", "truncate", "extractive"]
    for condition in ("truncate", "extractive"):
        assert summary[condition]["tokens_in"] < summary["rag"]["tokens_in"]
        assert 0 < summary[condition]["compression"] < 1 and summary[condition]["context_kept"] < 1
    rows = [json.loads(line) for line in (output / eval_rag.QUESTIONS_FILE).read_text().splitlines()]
    assert all(len(row["sources"]) == 4 for row in rows)  # 2 retrieved + 2 irrelevant
    assert all(row["truncate"]["context_tokens"] <= 24 and row["extractive"]["context_tokens"] <= 24 for row in rows)


def test_translate_flags_become_one_override():
    assert eval_rag.translate_flags(["a=1", "--compressor", "truncate", "--compressor=extractive=/x/y"]) == [
        "a=1", "compressors=[{name: truncate}, {name: extractive, scorer_dir: '/x/y'}]"]
    assert eval_rag.translate_flags(["top_k=3"]) == ["top_k=3"]
    [override] = eval_rag.translate_flags(["--compressor", "abstractive=/s", "--compressor", "abstractive"])
    assert override == "compressors=[{name: abstractive, summarizer_dir: '/s'}, {name: abstractive}]"
    config = eval_rag.EvalRagConfig(compressors=[{"name": "abstractive", "summarizer_dir": "/s"}, {"name": "abstractive"}])
    assert [eval_rag.label(c) for c in config.compressors] == ["abstractive+distilled", "abstractive"]


def test_a_plan_the_cluster_cannot_place_is_refused(ray_local):
    """Every compressor actor lives as long as the chat actor: asking for more CPUs than exist fails at once."""
    import ray

    cpus = ray.cluster_resources()["CPU"]
    config = eval_rag.EvalRagConfig(compressors=[{"name": "truncate", "label": "a"}, {"name": "truncate", "label": "b"}],
                                    chat_resources={"num_cpus": cpus}, compressor_resources={"num_cpus": 0.5})
    with pytest.raises(ValueError, match="do not fit"):
        eval_rag.check_resources(config)
    eval_rag.check_resources(config.model_copy(update={"chat_resources": eval_rag.ActorResources(num_cpus=cpus - 1)}))
