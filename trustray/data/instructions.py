"""Instruction data for influence estimation, in chat `messages` format.

The bundled source turns the Wikipedia intros into a training pool ("Tell me about X." -> the intro of X) and
per-topic target tasks from held-out intros, so the whole LESS pipeline runs offline: a topic's targets ask for
articles the pool never contains, and a good influence method should rank that topic's pool examples highest.
Users can bring their own pool as JSONL/Parquet or a Hugging Face dataset with the same row shape:

    {"id": "...", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], ...}
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trustray.data.corpus import load_wiki_corpus
from trustray.data.io import read_table

WIKI_SOURCE = "wiki"
HF_PREFIX = "hf:"
ROLES = ("system", "user", "assistant")
DEFAULT_TARGETS_PER_TOPIC = 10
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Tell me about {title}.",
    "What is {title}?",
    "Give me a short summary of {title}.",
    "Write a brief encyclopedia-style introduction to {title}.",
    "Explain {title} in a few sentences.",
    "What should I know about {title}?",
)


def truncate_text(text: str, max_chars: int | None) -> str:
    """At most `max_chars` characters, cut at a word boundary when there is one (keeps CPU sequences short)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else cut).rstrip()


def _example(doc: Mapping[str, str], prompt: str, max_chars: int | None, prefix: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{doc['id']}",
        "messages": [
            {"role": "user", "content": prompt.format(title=doc["title"])},
            {"role": "assistant", "content": truncate_text(doc["text"], max_chars)},
        ],
        "topic": doc["topic"],
        "source_id": doc["id"],
    }


def build_instruction_pool(
    n_train: int | None,
    n_target_per_topic: int,
    seed: int,
    topics: Sequence[str] | None = None,
    max_chars: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The influence training pool and the target tasks from the bundled Wikipedia intros; `(pool, targets)`.

    Deterministic for a seed (documents are ordered by id before shuffling, so neither file order nor Python's
    hash seed matters). Each topic first gives `n_target_per_topic` held-out intros as its targets
    (`task` = topic name, grouped by topic in sorted order); the pool is `n_train` of the remaining intros drawn at
    random over all chosen topics (all of them when `n_train` is None), so pool and targets never share a title.
    Pool rows: `{id, messages, topic, source_id}`; target rows add `task`. Prompt templates are drawn from the
    same seeded generator so the pool is not one fixed phrasing.
    """
    if n_target_per_topic < 0:
        raise ValueError(f"n_target_per_topic must be >= 0, got {n_target_per_topic}")
    if n_train is not None and n_train < 0:
        raise ValueError(f"n_train must be >= 0, got {n_train}")
    by_title: dict[str, dict[str, str]] = {}
    for doc in load_wiki_corpus():
        if doc["topic"]:
            by_title.setdefault(doc["title"], doc)
    by_topic: dict[str, list[dict[str, str]]] = {}
    for doc in sorted(by_title.values(), key=lambda row: row["id"]):
        by_topic.setdefault(doc["topic"], []).append(doc)
    chosen = sorted(by_topic) if topics is None else list(dict.fromkeys(topics))
    unknown = [topic for topic in chosen if topic not in by_topic]
    if unknown:
        raise ValueError(f"unknown topics {unknown}; the bundled corpus has {sorted(by_topic)}")
    if not chosen:
        raise ValueError("no topics chosen")
    rng = random.Random(seed)
    targets: list[dict[str, Any]] = []
    remaining: list[dict[str, str]] = []
    for topic in sorted(chosen):
        docs = list(by_topic[topic])
        if len(docs) <= n_target_per_topic:
            raise ValueError(
                f"topic {topic!r} has {len(docs)} intros; it cannot give {n_target_per_topic} targets "
                "and still leave training examples"
            )
        rng.shuffle(docs)
        for doc in docs[:n_target_per_topic]:
            target = _example(doc, rng.choice(PROMPT_TEMPLATES), max_chars, "target")
            target["task"] = topic
            targets.append(target)
        remaining.extend(docs[n_target_per_topic:])
    if n_train is not None and n_train > len(remaining):
        raise ValueError(
            f"n_train={n_train} exceeds the {len(remaining)} intros left in topics {sorted(chosen)} "
            f"after {n_target_per_topic} targets per topic"
        )
    rng.shuffle(remaining)
    picked = remaining if n_train is None else remaining[:n_train]
    pool = [_example(doc, rng.choice(PROMPT_TEMPLATES), max_chars, "inst") for doc in picked]
    return pool, targets


def validate_instruction_rows(rows: Sequence[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
    """Check rows are chat examples and return them as plain dicts with string ids.

    Required: a unique non-empty `id`; `messages`, a non-empty list of `{role, content}` with role one of
    system/user/assistant and string content; the last message from the assistant with non-empty content
    (the influence loss is taken on the response, so a row without one has no gradient). Extra columns stay.
    """
    if not rows:
        raise ValueError(f"{source}: no rows")
    seen: set[str] = set()
    checked: list[dict[str, Any]] = []
    for number, row in enumerate(rows):
        where = f"{source}: row {number}"
        if row.get("id") in (None, ""):
            raise ValueError(f"{where} lacks an `id`; every example needs a unique id (found: {sorted(row)})")
        example_id = str(row["id"])
        where = f"{where} (id {example_id!r})"
        if example_id in seen:
            raise ValueError(f"{where}: duplicate id; ids must be unique")
        seen.add(example_id)
        messages = row.get("messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
        for position, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"{where}: message {position} must be an object with `role` and `content`")
            if message["role"] not in ROLES:
                raise ValueError(
                    f"{where}: message {position} has role {message['role']!r}; use one of {list(ROLES)}"
                )
            if not isinstance(message["content"], str):
                raise ValueError(f"{where}: message {position} content must be a string")
        last = messages[-1]
        if last["role"] != "assistant" or not last["content"].strip():
            raise ValueError(
                f"{where}: the last message must be a non-empty assistant response "
                f"(found role {last['role']!r}); the influence loss is taken on it"
            )
        checked.append(
            {
                **row,
                "id": example_id,
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            }
        )
    return checked


def _load_hf(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset: `hf:<name>` (from the local HF cache or hub) or a `save_to_disk` folder."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"loading {source!r} needs the Hugging Face `datasets` package, which is not installed; "
            "install it (pip install datasets) or export the dataset to JSONL/Parquet"
        ) from error
    if source.startswith(HF_PREFIX):
        name = source[len(HF_PREFIX) :]
        if not name:
            raise ValueError(f"{source!r}: give a dataset name after {HF_PREFIX!r}")
        dataset = datasets.load_dataset(name, split=split)
    else:
        dataset = datasets.load_from_disk(source)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source}: no split {split!r}; it has {sorted(dataset)}")
            dataset = dataset[split]
    return [dict(row) for row in dataset]


def load_instruction_dataset(
    source: str | Path,
    *,
    split: str = "train",
    n_train: int | None = None,
    n_target_per_topic: int = DEFAULT_TARGETS_PER_TOPIC,
    seed: int = 0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """A validated instruction pool from `source`; first `limit` rows if set.

    `"wiki"`: the bundled pool of `build_instruction_pool` (its targets held out). A `.jsonl`/`.json`/`.parquet`
    file: a user's pool. `hf:<name>` or a folder written by `datasets.save_to_disk`: a Hugging Face dataset
    (needs `datasets`), `split` chosen from it.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    text = str(source)
    if text == WIKI_SOURCE:
        rows, _ = build_instruction_pool(n_train, n_target_per_topic, seed)
    elif text.startswith(HF_PREFIX) or Path(text).is_dir():
        rows = validate_instruction_rows(_load_hf(text, split), text)
    else:
        rows = validate_instruction_rows(read_table(text), text)
    return rows if limit is None else rows[:limit]
