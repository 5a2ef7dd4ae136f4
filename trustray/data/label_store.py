"""Preference labels from people, kept in SQLite: the labeling service writes them, the preference loop reads them.

One database file holds
- `items`: the pairs waiting for a label (a prompt in conversational form and two responses a, b), added by the
  loop or a user; an item's id is given by its adder (the loop uses its pair key), and adding it again is a no-op;
- `labels`: one row per (item, labeler), with the labeler's answer in the item's own terms (`a`, `b`, `tie`,
  `skip`) and the idempotency key of the request that stored it.

Labelers see the two responses in an order drawn per (item, labeler) from a hash, so the order is random but the
same on every reload, and their answer (`first` / `second`) is mapped back to a or b before it is stored.

Nothing is lost on a crash: the database runs in WAL mode with synchronous=FULL, and each write is one
transaction. A label posted twice with the same idempotency key is stored once and answered the same way both
times; a second, different answer by the same labeler to the same item is refused. Several processes may share
the file (the service's replicas and the loop) on one machine or on a file system with working locks.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHOICES = ("first", "second", "tie", "skip")
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    extra TEXT NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    item_id TEXT NOT NULL REFERENCES items(id),
    labeler TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('a', 'b', 'tie', 'skip')),
    idempotency_key TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    PRIMARY KEY (item_id, labeler)
);
"""


class LabelConflict(ValueError):
    """A request that contradicts a stored label (the same labeler answering an item differently, or an
    idempotency key reused for another label)."""


class UnknownItem(KeyError):
    """No item with that id."""


@dataclass(frozen=True)
class Shown:
    """An item as one labeler sees it: responses in that labeler's order (`swapped`: b is shown first)."""

    item_id: str
    prompt: list[dict[str, str]]
    first: str
    second: str
    swapped: bool


def shown_swapped(item_id: str, labeler: str) -> bool:
    return hashlib.sha256(f"{item_id}\x00{labeler}".encode()).digest()[0] % 2 == 1


class LabelStore:
    """The SQLite file at `path` (created with its tables when missing)."""

    def __init__(self, path: str | Path, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.timeout_s = timeout_s
        self._connection().executescript(SCHEMA)  # IF NOT EXISTS: safe when another process created them

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self):
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- items ---------------------------------------------------------------------------------------------------
    def add_items(self, items: Iterable[Mapping[str, Any]]) -> int:
        """Add `{"id", "prompt" (messages), "a", "b", ...extra}` items; returns how many were new."""
        added = 0
        with self._transaction() as db:
            for item in items:
                missing = {"id", "prompt", "a", "b"} - item.keys()
                if missing:
                    raise ValueError(f"an item needs {sorted(missing)}")
                prompt = item["prompt"]
                if isinstance(prompt, str):
                    prompt = [{"role": "user", "content": prompt}]
                extra = {key: value for key, value in item.items() if key not in ("id", "prompt", "a", "b")}
                cursor = db.execute("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?)",
                                    (str(item["id"]), json.dumps(prompt), item["a"], item["b"], json.dumps(extra),
                                     time.time()))
                added += cursor.rowcount
        return added

    def next_item(self, labeler: str) -> Shown | None:
        """The oldest item nobody has labelled yet (None when there is none)."""
        row = self._connection().execute(
            "SELECT id, prompt, a, b FROM items WHERE id NOT IN (SELECT item_id FROM labels) "
            "ORDER BY added, id LIMIT 1").fetchone()
        if row is None:
            return None
        item_id, prompt, a, b = row
        swapped = shown_swapped(item_id, labeler)
        return Shown(item_id, json.loads(prompt), b if swapped else a, a if swapped else b, swapped)

    # -- labels --------------------------------------------------------------------------------------------------
    def submit(self, item_id: str, labeler: str, choice: str, idempotency_key: str) -> tuple[str, bool]:
        """Store `labeler`'s choice (in display terms) on `item_id`; returns (label in a/b terms, newly stored)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if not idempotency_key:
            raise ValueError("an idempotency key is required")
        swapped = shown_swapped(item_id, labeler)
        label = {"first": "b" if swapped else "a", "second": "a" if swapped else "b"}.get(choice, choice)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise UnknownItem(item_id)
            same_key = db.execute("SELECT item_id, labeler, label FROM labels WHERE idempotency_key = ?",
                                  (idempotency_key,)).fetchone()
            if same_key is not None:
                if same_key != (item_id, labeler, label):
                    raise LabelConflict(f"idempotency key {idempotency_key!r} was used for another label")
                return label, False
            stored = db.execute("SELECT label FROM labels WHERE item_id = ? AND labeler = ?",
                                (item_id, labeler)).fetchone()
            if stored is not None:
                raise LabelConflict(f"{labeler} already labelled item {item_id!r} ({stored[0]})")
            db.execute("INSERT INTO labels VALUES (?, ?, ?, ?, ?)", (item_id, labeler, label, idempotency_key,
                                                                    time.time()))
        return label, True

    def labels(self, item_ids: Sequence[str] | None = None) -> dict[str, str]:
        """The first label stored for each item (by time), optionally only for `item_ids`."""
        rows = self._connection().execute("SELECT item_id, label FROM labels ORDER BY created DESC").fetchall()
        labels = dict(rows)  # later rows are older: the earliest label wins
        if item_ids is None:
            return labels
        return {item_id: labels[item_id] for item_id in item_ids if item_id in labels}

    def counts(self) -> dict[str, int]:
        db = self._connection()
        items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        labelled = db.execute("SELECT COUNT(DISTINCT item_id) FROM labels").fetchone()[0]
        return {"items": items, "labelled": labelled, "labels": db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]}

    def export_rows(self) -> list[dict[str, Any]]:
        """Every labelled item with a preference, in TRL's conversational format (labeler and item id kept)."""
        from trustray.data.preferences import preference_row

        rows = []
        query = ("SELECT items.id, prompt, a, b, extra, labeler, label FROM labels JOIN items ON items.id = item_id "
                 "WHERE label IN ('a', 'b') ORDER BY labels.created")
        for item_id, prompt, a, b, extra, labeler, label in self._connection().execute(query):
            chosen, rejected = (a, b) if label == "a" else (b, a)
            rows.append(preference_row(json.loads(prompt), chosen, rejected, item_id=item_id, labeler=labeler,
                                       **json.loads(extra)))
        return rows

    def wait_for_labels(self, item_ids: Sequence[str], timeout_s: float, poll_s: float = 1.0) -> dict[str, str]:
        """Labels of `item_ids` once all exist or `timeout_s` has passed (the ones that exist by then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            labels = self.labels(item_ids)
            if len(labels) == len(set(item_ids)) or time.monotonic() >= deadline:
                return labels
            time.sleep(poll_s)
