"""`trustray eval rag` on tiny models: the pipeline runs on Ray and writes well-formed results."""

import json
from pathlib import Path

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
    output = tmp_path / "eval" / "rag.json"
    summary = eval_rag.run(
        load_config(
            eval_rag.EvalRagConfig,
            CONFIGS / "eval_rag/tiny.yaml",
            [f"index_dir={index_dir}", f"embedder.model={tiny_embedder_dir}", f"chat.model={tiny_llama_dir}",
             f"output={output}"],
        )
    )
    written = json.loads(output.read_text())
    assert written["n_questions"] == 6 == summary["n_questions"]
    for mode in ("closed_book", "rag"):
        assert set(written[mode]) >= {"em", "f1", "contains"}
        assert all(0.0 <= written[mode][key] <= 1.0 for key in ("em", "f1", "contains"))
    # Retrieved passages make the RAG prompt longer than the closed-book one.
    assert written["rag"]["prompt_tokens_mean"] > written["closed_book"]["prompt_tokens_mean"]
    rows = [json.loads(line) for line in output.with_suffix(".questions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(row["rag"]["sources"]) == 2 for row in rows)
    assert "closed_book" in eval_rag.format_table(summary)
