"""Retrieval quality first: recall@1/3/5/10 of the gold page for the dense index, BM25 and their fusion.

On the RAG evaluation set (`trustray.data.rag_eval`: the tuning part, and the reporting part by source), a question
counts as recalled at k when a passage of its gold page is among the top k. Dense is the index `trustray serve`
uses (all-MiniLM-L6-v2, FAISS inner product); BM25 is `trustray.core.rag.lexical` over the same passages; hybrid is
reciprocal-rank fusion (constant 60) of the top 100 of each. Writes benchmarks/results/retrieval_recall.json: rows
{retriever, split, source, n_questions, recall@k...}, plus the machine.
Run: .venv/bin/python benchmarks/retrieval_recall.py [--index-dir outputs/index/wiki-minilm]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from trustray.actors.retriever import Retriever
from trustray.artifacts import atomic_write_text
from trustray.core.rag.lexical import LexicalIndex, reciprocal_rank_fusion
from trustray.data.rag_eval import SPLITS, load_rag_eval
from trustray.pipelines.eval_rag import RECALL_AT, doc_id
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "retrieval_recall.json"
FUSED_DEPTH = 100


def recall(gold: list[str], rankings: list[list[str]]) -> dict[str, float]:
    return {f"recall@{k}": float(np.mean([g in {doc_id(p) for p in ranking[:k]} for g, ranking in
                                          zip(gold, rankings, strict=True)])) for k in RECALL_AT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-dir", default=str(ROOT / "outputs/index/wiki-minilm"))
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    dense = Retriever(args.index_dir)
    began = time.perf_counter()
    lexical = LexicalIndex(dense.index.ids, dense.index.titles, dense.index.texts)
    bm25_seconds = time.perf_counter() - began
    rows = []
    for split in SPLITS:
        questions = load_rag_eval(split)
        texts = [q["question"] for q in questions]
        rankings = {"dense": [[p.id for p in found] for found in dense.retrieve(texts, FUSED_DEPTH)],
                    "bm25": [[pid for pid, _ in found] for found in lexical.search(texts, FUSED_DEPTH)]}
        rankings["hybrid"] = [reciprocal_rank_fusion([a, b], FUSED_DEPTH)
                              for a, b in zip(rankings["dense"], rankings["bm25"], strict=True)]
        sources = sorted({q["metadata"]["source"] for q in questions})
        for source in ["all", *sources] if len(sources) > 1 else sources:
            picked = [i for i, q in enumerate(questions) if source in ("all", q["metadata"]["source"])]
            gold = [questions[i]["metadata"]["gold_doc_id"] for i in picked]
            for retriever, ranked in rankings.items():
                rows.append({"retriever": retriever, "split": split, "source": source, "n_questions": len(picked),
                             **recall(gold, [ranked[i] for i in picked])})
                print(json.dumps(rows[-1]))
    report = {"machine": machine_info(), "index_dir": args.index_dir, "passages": len(dense.index),
              "bm25_build_seconds": round(bm25_seconds, 2), "rows": rows,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    atomic_write_text(RESULT, json.dumps(report, indent=2) + "\n")
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
