"""Index-build throughput: the build_index Ray Data pipeline vs a plain single-process sentence-transformers loop.

Both embed the SAME passages (the ones the pipeline produced) with the built-in MiniLM, in this one process.
The pipeline runs on local Ray with the cpu preset's pool (2 actors x 0.5 CPU, torch_threads=1 each); the loop
is `Embedder.encode` in this process with torch's default threads.

One-off startup is included on both sides: the pipeline's clock covers Ray worker start, torch import and model
load in the actors, splitting and embedding; the loop's covers model load and encoding (torch is already imported
in this process, so this favours the loop). Per-batch arrival times at the driver cannot isolate steady state:
Ray Data hands the driver a few coalesced blocks, often all at once.

With `--compare-backends onnx-int8`, the pipeline runs again with each other embedder backend: its rate against
the same loop, how close its vectors are to the float32 ones (cosine), and, with `--docs all`, recall@k of the
gold page on the RAG evaluation set (`trustray.data.rag_eval`) for each backend's index and queries.

    python benchmarks/index_build.py [--docs 2000|all] [--config configs/build_index/cpu.yaml]
        [--compare-backends onnx-int8] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "index_build.json"
REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="2000", help="number of Wikipedia intros, or 'all' (10,033)")
    parser.add_argument("--config", default=str(REPO / "configs/build_index/cpu.yaml"))
    parser.add_argument("--output", default=str(RESULT))
    parser.add_argument("--compare-backends", nargs="*", default=[], choices=["torch", "onnx-int8"],
                        help="embedder backends also run through the pipeline")
    parser.add_argument("overrides", nargs="*", help="build_index config overrides, e.g. resources.size=1")
    args = parser.parse_args(argv)

    from trustray.runtime import apply_offline_defaults, machine_info, setup_logging

    apply_offline_defaults()
    setup_logging("WARNING")
    import ray
    import torch

    from trustray.actors.cluster import init_ray
    from trustray.config import load_config
    from trustray.data.corpus import load_corpus
    from trustray.models.embedders import Embedder, EmbedderConfig
    from trustray.pipelines.build_index import BuildIndexConfig, collect_passages, passage_dataset

    limit = None if args.docs == "all" else int(args.docs)
    # Only the dataset plan is used: nothing is written to the config's output_dir.
    config = load_config(BuildIndexConfig, args.config, args.overrides)
    rows = load_corpus(config.corpus, limit)
    init_ray()

    start = time.perf_counter()
    passages = collect_passages(passage_dataset(config, rows).iter_batches(batch_size=None, batch_format="numpy"))
    pipeline_seconds = time.perf_counter() - start
    count = len(passages["id"])
    ray.shutdown()

    # Loop: the same passage texts, one process, default torch threads (the driver has no thread limit set).
    texts = passages["text"].tolist()
    loop_config = EmbedderConfig(model=config.embedder.model, batch_size=config.embedder.batch_size)
    start = time.perf_counter()
    vectors = Embedder(loop_config).encode(texts)
    loop_seconds = time.perf_counter() - start
    max_diff = float(abs(vectors - passages["embedding"]).max())

    pipeline_rate = count / pipeline_seconds
    loop_rate = count / loop_seconds
    backends = {config.embedder.backend: {"pipeline_seconds": round(pipeline_seconds, 2),
                                          "pipeline_passages_per_s": round(pipeline_rate, 2),
                                          "ratio_to_loop": round(pipeline_rate / loop_rate, 3)}}
    vectors_of = {config.embedder.backend: passages["embedding"]}
    for backend in args.compare_backends:
        other = config.model_copy(update={"embedder": config.embedder.model_copy(update={"backend": backend})})
        init_ray()
        start = time.perf_counter()
        found = collect_passages(passage_dataset(other, rows).iter_batches(batch_size=None, batch_format="numpy"))
        seconds = time.perf_counter() - start
        ray.shutdown()
        if found["id"].tolist() != passages["id"].tolist():
            raise RuntimeError(f"the {backend} pipeline produced other passages than the first run")
        vectors_of[backend] = found["embedding"]
        cosine = (found["embedding"] * passages["embedding"]).sum(axis=1)
        backends[backend] = {"pipeline_seconds": round(seconds, 2), "pipeline_passages_per_s": round(count / seconds, 2),
                             "ratio_to_loop": round(count / seconds / loop_rate, 3),
                             "cosine_to_first": {"mean": float(cosine.mean()), "min": float(cosine.min())}}
    if limit is None and len(vectors_of) > 1:
        for backend, embedded in vectors_of.items():
            backends[backend]["recall"] = eval_set_recall(config.embedder.model_copy(update={"backend": backend}),
                                                          embedded, passages)
    result = {
        "machine": {**machine_info(), "torch_threads_loop": torch.get_num_threads()},
        "docs": len(rows),
        "passages": count,
        "pipeline": {
            "pool_size": config.resources.size,
            "actor_num_cpus": config.resources.num_cpus,
            "actor_torch_threads": config.embedder.torch_threads,
            "batch_size": config.batch_size,
            "embedder_batch_size": config.embedder.batch_size,
            "passage_tokens": config.passage_tokens,
        },
        "startup": "included on both sides (pipeline: Ray workers, torch import and model load in the actors, "
        "splitting; loop: model load in this process, torch already imported)",
        "pipeline_seconds": round(pipeline_seconds, 2),
        "loop_seconds": round(loop_seconds, 2),
        "pipeline_passages_per_s": round(pipeline_rate, 2),
        "loop_passages_per_s": round(loop_rate, 2),
        "ratio": round(pipeline_rate / loop_rate, 3),
        "max_abs_embedding_difference": max_diff,
        "backends": backends,
        "command": " ".join(["python", "benchmarks/index_build.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def eval_set_recall(embedder_config, vectors, passages) -> dict:
    """recall@k of the gold page on each part of the RAG evaluation set, for an index of `vectors`."""
    from trustray.core.rag.index import PassageIndex
    from trustray.data.rag_eval import SPLITS, load_rag_eval
    from trustray.models.embedders import Embedder
    from trustray.pipelines.eval_rag import recall_at

    index = PassageIndex(vectors, passages["id"].tolist(), passages["title"].tolist(), passages["text"].tolist())
    embedder = Embedder(embedder_config)
    found = {}
    for split in SPLITS:
        questions = load_rag_eval(split)
        retrieved = index.search(embedder.encode([q["question"] for q in questions]), 10)
        for source in sorted({q["metadata"]["source"] for q in questions}):
            picked = [i for i, q in enumerate(questions) if q["metadata"]["source"] == source]
            found[f"{split}/{source}"] = recall_at([questions[i] for i in picked], [retrieved[i] for i in picked])
    return found


if __name__ == "__main__":
    main()
