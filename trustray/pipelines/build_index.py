"""Build a dense passage index on Ray Data: corpus rows -> sentence-aware passages -> embeddings -> FAISS.

    python -m trustray.pipelines.build_index --config configs/build_index/cpu.yaml [key=value ...]

The result is a self-describing folder (`index.faiss`, `passages.parquet`, `metadata.json`) written atomically;
rerunning with the same settings reuses it, other settings raise `ArtifactMismatchError` unless `force`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

import trustray
from trustray.artifacts import atomic_folder, check_metadata, write_metadata
from trustray.config import PipelineConfig, PoolResources
from trustray.core.rag.index import PassageIndex
from trustray.core.rag.passages import split_passages
from trustray.data.corpus import load_corpus
from trustray.models.embedders import Embedder, EmbedderConfig, embedder_fingerprint
from trustray.models.sources import resolve_model_source
from trustray.pipelines import prepare_output

logger = logging.getLogger(__name__)

ARTIFACT_KIND = "passage_index"
# [CLS] and [SEP] are added around every passage when it is embedded.
SPECIAL_TOKENS = 2
# Documents per input block: Ray Data's default of one block per item makes thousands of tiny split tasks.
DOCS_PER_BLOCK = 250


class BuildIndexConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/index"

    name: str = Field("wiki-minilm", description="Index name; the default folder is outputs/index/<name>.")
    corpus: str = Field("wiki", description="'wiki' (bundled Wikipedia intros) or a JSONL/Parquet corpus path.")
    limit: int | None = Field(None, ge=1, description="Use only the first N documents (None: all).")
    every: int = Field(
        1, ge=1, description="Index only every `every`-th document (corpus rank % every == every_offset, after "
        "`limit`): a quick first slice of a corpus (`trustray quickstart` answers from one while the full index builds)."
    )
    every_offset: int = Field(0, ge=0, description="Which of each `every` documents is kept (below `every`).")
    passage_tokens: int = Field(
        200, ge=8, description="Token budget per passage (embedder tokens; MiniLM's max_seq_length is 256)."
    )
    overlap_sentences: int = Field(0, ge=0, description="Trailing sentences repeated at the next passage's start.")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="Passage embedder.")
    batch_size: int = Field(256, ge=1, description="Passages per map_batches call on an embedding actor.")
    resources: PoolResources = Field(default_factory=PoolResources, description="Embedding actor pool.")
    split_cpus: float = Field(1.0, gt=0, description="CPUs each passage-splitting task reserves (fractional to "
                              "build beside other work, e.g. a Serve app holding most of a small machine).")


    @model_validator(mode="after")
    def _offset_below_every(self) -> BuildIndexConfig:
        if self.every_offset >= self.every:
            raise ValueError(f"every_offset={self.every_offset} must be below every={self.every}")
        return self


def corpus_rows(config: BuildIndexConfig) -> list[dict[str, str]]:
    """The documents the index holds: the corpus (its first `limit`), every `every`-th from `every_offset`."""
    return load_corpus(config.corpus, config.limit)[config.every_offset :: config.every]


def corpus_fingerprint(rows: list[dict[str, str]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        for key in ("id", "title", "text"):
            digest.update(row[key].encode("utf-8"))
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def expected_metadata(config: BuildIndexConfig, rows: list[dict[str, str]]) -> dict[str, Any]:
    """What an existing index must agree on to be reused."""
    return {
        "kind": ARTIFACT_KIND,
        "corpus": config.corpus,
        "limit": config.limit,
        # Recorded only for a slice, so indexes built before slices existed are still reused.
        **({"every": config.every, "every_offset": config.every_offset} if config.every > 1 else {}),
        "num_docs": len(rows),
        "corpus_fingerprint": corpus_fingerprint(rows),
        "embedder": config.embedder.model,
        "embedder_fingerprint": embedder_fingerprint(config.embedder),
        "normalize": config.embedder.normalize,
        "passage_tokens": config.passage_tokens,
        "overlap_sentences": config.overlap_sentences,
        "trustray_version": trustray.__version__,
    }


def embedder_max_tokens(model: str) -> int | None:
    """Tokens the embedder reads per text: sentence-transformers' max_seq_length (older folders record it in
    `sentence_bert_config.json`), else the tokenizer's `model_max_length`; None when neither is recorded."""
    folder = Path(resolve_model_source(model))
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            # Tokenizers without a limit record a huge sentinel (1e30) instead of leaving it out.
            if isinstance(value, int) and value < 1_000_000:
                return value
    return None


@lru_cache(maxsize=4)
def _tokenizer(model: str):
    # Cached per worker process: Ray Data reuses workers, so each loads the tokenizer once, not per row.
    from trustray.models.loading import load_tokenizer

    return load_tokenizer(model)


def split_document(row: dict[str, Any], model: str, passage_tokens: int, overlap_sentences: int) -> list[dict]:
    """One corpus row -> its passages `{id: "<doc_id>#<i>", doc_id, title, text, ...}`."""
    tokenizer = _tokenizer(model)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = split_passages(row["text"], passage_tokens, count_tokens, overlap_sentences)
    return [
        {
            "id": f"{row['id']}#{i}",
            "doc_id": row["id"],
            "doc_rank": row["doc_rank"],
            "passage_index": i,
            "title": row["title"],
            "text": text,
        }
        for i, text in enumerate(texts)
    ]


class EmbedBatch:
    """Ray Data callable class: loads the embedder once per actor and adds an `embedding` column."""

    def __init__(self, config: EmbedderConfig):
        self.embedder = Embedder(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["embedding"] = self.embedder.encode([str(text) for text in batch["text"]])
        return batch


def passage_dataset(config: BuildIndexConfig, rows: list[dict[str, str]]):
    """The lazy Ray Data plan: corpus rows -> passages (tasks) -> passages with `embedding` (actor pool)."""
    import ray

    from trustray.actors.cluster import init_ray

    init_ray()
    items = [{**row, "doc_rank": rank} for rank, row in enumerate(rows)]
    pool = config.resources
    # At least two blocks per actor so every actor gets work, even for a small corpus.
    num_blocks = min(len(items), max(2 * pool.size, -(-len(items) // DOCS_PER_BLOCK)))
    return (
        ray.data.from_items(items, override_num_blocks=num_blocks)
        .flat_map(
            split_document,
            num_cpus=config.split_cpus,
            fn_kwargs={
                "model": config.embedder.model,
                "passage_tokens": config.passage_tokens,
                "overlap_sentences": config.overlap_sentences,
            },
        )
        .map_batches(
            EmbedBatch,
            fn_constructor_kwargs={"config": config.embedder},
            compute=ray.data.ActorPoolStrategy(size=pool.size),
            **pool.ray_options(),
            batch_size=config.batch_size,
            batch_format="numpy",
        )
    )


def collect_passages(batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate embedded batches and sort them to corpus order."""
    columns: dict[str, list] = {key: [] for key in ("id", "title", "text", "doc_rank", "passage_index", "embedding")}
    for batch in batches:
        for key in columns:
            columns[key].append(batch[key])
    if not columns["id"]:
        raise ValueError("the corpus produced no passages (are all texts empty?)")
    merged = {key: np.concatenate(parts) for key, parts in columns.items()}
    # Blocks arrive in completion order; sort to corpus order so the same input gives the same index.
    order = np.lexsort((merged["passage_index"], merged["doc_rank"]))
    return {key: values[order] for key, values in merged.items()}


def embed_passages(config: BuildIndexConfig, rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """Split and embed on Ray Data; returns the passages in corpus order with their vectors."""
    dataset = passage_dataset(config, rows)
    return collect_passages(dataset.iter_batches(batch_size=None, batch_format="numpy"))


def is_built(config: BuildIndexConfig) -> bool:
    """True when `run(config)` would reuse a finished index (an index made with other settings raises)."""
    return not config.force and check_metadata(config.output_path(), expected_metadata(config, corpus_rows(config)),
                                               kind="passage index")


def run(config: BuildIndexConfig) -> Path:
    """Build (or reuse) the passage index described by `config`; returns its folder."""
    output_dir = prepare_output(config)
    rows = corpus_rows(config)
    expected = expected_metadata(config, rows)
    if check_metadata(output_dir, expected, kind="passage index"):
        logger.info("reusing the passage index at %s (same corpus, embedder and settings)", output_dir)
        return output_dir
    max_tokens = embedder_max_tokens(config.embedder.model)
    if max_tokens is not None and config.passage_tokens + SPECIAL_TOKENS > max_tokens:
        raise ValueError(
            f"passage_tokens={config.passage_tokens} does not fit the embedder's max_seq_length={max_tokens} "
            f"(with {SPECIAL_TOKENS} special tokens); longer passages would be truncated when embedded"
        )

    start = time.perf_counter()
    logger.info("building a passage index of %d documents from %r into %s", len(rows), config.corpus, output_dir)
    passages = embed_passages(config, rows)
    elapsed = time.perf_counter() - start
    count = len(passages["id"])
    index = PassageIndex(
        passages["embedding"], passages["id"].tolist(), passages["title"].tolist(), passages["text"].tolist()
    )
    with atomic_folder(output_dir) as tmp:
        index.save(tmp)
        write_metadata(
            tmp,
            {
                **expected,
                "dim": index.dim,
                "embedder_backend": config.embedder.backend,
                "num_passages": count,
                "build_seconds": round(elapsed, 2),
                "config": config.model_dump(mode="json"),
            },
        )
    logger.info("indexed %d passages from %d documents in %.1f s (%.1f passages/s)",
                count, len(rows), elapsed, count / elapsed)
    return output_dir


PIPELINE = {"config": BuildIndexConfig, "run": run}


if __name__ == "__main__":
    # Run through the importable module, not `__main__`: Ray pickles functions defined in `__main__` by value,
    # and workers cannot resolve their module-level helpers.
    from trustray.pipelines import run_module

    run_module("build_index")
