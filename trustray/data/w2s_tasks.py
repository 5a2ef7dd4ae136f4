"""Classification tasks for weak-to-strong supervision, built from packaged data (nothing is downloaded).

- `verification` (answer verification, SciQ-style): a factual question of the bundled edit records (train and dev
  splits only: the test split stays for editing's evaluation) with either its true answer (`target_true`) or the
  record's counterfactual answer of the same relation (`target_new`), 50/50 by a seeded draw, one candidate per
  question. Text: "Question: <prompt>\nProposed answer: <candidate>"; label 1 when the candidate is true. A same-
  relation distractor has the right type (a city for a city), so only knowing the fact separates them.
- `topics`: two confusable corpus topics (by default Physical sciences vs Technology; "Uncategorized" is refused):
  the first `max_words` words of a page's introduction (its title left out); label = index of the page's topic in
  `topics`. Classes are balanced by keeping as many pages of the larger topic as the smaller has.

Each task is a `ClassificationTask`: a seeded test set held apart, and the rest for training (the weak-to-strong
protocol halves it: `trustray.core.w2s.protocol`). The same seed gives the same task on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

CLASSIFICATION_TASKS = ("verification", "topics")
DEFAULT_TOPICS = ("Physical sciences", "Technology")


@dataclass(frozen=True)
class ClassificationExample:
    id: str
    text: str
    label: int


@dataclass(frozen=True)
class ClassificationTask:
    name: str
    classes: tuple[str, ...]
    train: list[ClassificationExample]
    test: list[ClassificationExample]

    def class_balance(self) -> list[float]:
        """Share of each class among the training examples."""
        counts = [0] * len(self.classes)
        for example in self.train:
            counts[example.label] += 1
        return [count / len(self.train) for count in counts]


def _split(name: str, classes: tuple[str, ...], examples: list[ClassificationExample], train: int, test: int,
           seed: int) -> ClassificationTask:
    if train < 2 or test < 1:
        raise ValueError(f"need at least 2 training and 1 test examples; got {train}, {test}")
    if train + test > len(examples):
        raise ValueError(f"task {name!r} has {len(examples)} examples; {train} training + {test} test were asked for")
    random.Random(seed).shuffle(examples)
    return ClassificationTask(name, classes, examples[test : test + train], examples[:test])


def verification_task(train: int, test: int, seed: int = 0) -> ClassificationTask:
    """See the module docstring."""
    from trustray.data.edits import load_edit_split

    rng = random.Random(seed)
    examples = []
    for record in load_edit_split("train", seed=0) + load_edit_split("dev", seed=0):
        if record["target_new"].strip().lower() == record["target_true"].strip().lower():
            continue
        true = rng.random() < 0.5
        candidate = record["target_true"] if true else record["target_new"]
        examples.append(ClassificationExample(record["id"], f"Question: {record['prompt']}\nProposed answer: {candidate}",
                                              int(true)))
    examples.sort(key=lambda example: example.id)
    return _split("verification", ("incorrect", "correct"), examples, train, test, seed)


def topics_task(train: int, test: int, seed: int = 0, topics: Sequence[str] = DEFAULT_TOPICS,
                max_words: int = 40) -> ClassificationTask:
    """See the module docstring."""
    from trustray.data.corpus import load_wiki_corpus

    topics = tuple(topics)
    docs = load_wiki_corpus()
    known = sorted({doc["topic"] for doc in docs} - {"Uncategorized"})
    if len(topics) < 2 or len(set(topics)) != len(topics) or any(topic not in known for topic in topics):
        raise ValueError(f"topics must be at least two distinct corpus topics (not 'Uncategorized'); got "
                         f"{list(topics)}; known: {known}")
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    rng = random.Random(seed)
    by_topic = {topic: sorted((doc for doc in docs if doc["topic"] == topic), key=lambda doc: doc["id"])
                for topic in topics}
    smallest = min(len(pages) for pages in by_topic.values())
    examples = []
    for label, topic in enumerate(topics):
        pages = by_topic[topic]
        rng.shuffle(pages)
        examples += [ClassificationExample(doc["id"], " ".join(doc["text"].split()[:max_words]), label)
                     for doc in pages[:smallest]]
    examples.sort(key=lambda example: example.id)
    return _split("topics", topics, examples, train, test, seed)


def load_classification_task(name: str, train: int, test: int, seed: int = 0, **settings) -> ClassificationTask:
    """A task of `CLASSIFICATION_TASKS` by name (settings: `topics`, `max_words` for `topics`)."""
    if name == "verification":
        if settings:
            raise ValueError(f"the verification task takes no settings, got {sorted(settings)}")
        return verification_task(train, test, seed)
    if name == "topics":
        return topics_task(train, test, seed, **settings)
    raise ValueError(f"unknown classification task {name!r}; available: {', '.join(CLASSIFICATION_TASKS)}")
