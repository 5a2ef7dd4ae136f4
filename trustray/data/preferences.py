"""Preference data for alignment: prompts, programmatic oracles with a documented gold reward, TRL's format.

Two tasks, both built from packaged data (nothing is downloaded):

- `factual`: short factual questions with gold answers. Half are the true facts of the bundled edit records
  (`trustray.data.edits`, train and dev splits only: the test split stays for editing's evaluation), asked with
  the record's prompt and answered by `target_true`; half are corpus cloze questions (`trustray.data.cloze`,
  which leaves out every FanOutQA evidence page).
  Gold reward: r*(y) = max(contained, token F1) − length_penalty · excess, where `contained` is 1 when a gold
  answer appears in the response (normalised as in SQuAD, `trustray.core.rag.metrics`), token F1 is against the best gold answer, and
  `excess` = max(0, words(y) − free_words) / free_words, capped at 1. A correct short answer scores 1, a correct
  answer buried in a long reply less, a wrong one about 0 or below.
- `sentiment`: continue the beginning of a corpus sentence (its first `prefix_words` words) positively: the
  DPO paper's controlled-sentiment task, on Wikipedia intros instead of IMDb reviews (also FanOutQA evidence
  pages excluded). Gold reward: r*(y) = the compound score of `vaderSentiment` (a lexicon shipped in its wheel)
  of the continuation, in [−1, 1].

Labels. An oracle compares two responses a and b to a prompt as a noisy annotator would:

- a skip with probability `skip_rate` (the annotator declines);
- a tie when |r*(a) − r*(b)| ≤ `tie_margin` (the annotator cannot tell them apart);
- otherwise a ≻ b with probability σ((r*(a) − r*(b)) / τ), Bradley–Terry noise of temperature τ; τ = 0 gives
  deterministic labels (the higher gold reward wins).

The randomness of one label is seeded by the oracle's `seed` and the (prompt, a, b) triple, so asking again gives
the same label in any order and after any restart.

Files are TRL's preference format, conversational form: `prompt` a list of messages, `chosen` and `rejected` one
assistant message each; other fields (task, gold rewards, labeler) ride along. `read_preferences` also takes the
standard form (plain strings) and turns it into the conversational one, so a user's own preference file (JSONL
or Parquet) works the same way.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from trustray.core.rag.metrics import answer_contained, token_f1
from trustray.data.io import PARQUET_SUFFIXES, read_table, write_jsonl

TASKS = ("factual", "sentiment")
Label = Literal["a", "b", "tie", "skip"]
LABELS: tuple[str, ...] = ("a", "b", "tie", "skip")


@dataclass(frozen=True)
class PreferencePrompt:
    """One prompt of a preference task: `gold` holds the factual task's gold answers (empty for sentiment);
    `topic` is the corpus topic of the page it comes from (what an OOD check can hold out)."""

    id: str
    task: str
    prompt: str
    gold: tuple[str, ...] = ()
    topic: str = ""

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def factual_prompts(count: int, seed: int = 0) -> list[PreferencePrompt]:
    """`count` factual questions, half edit-record facts (train and dev splits), half corpus cloze questions."""
    from trustray.data.cloze import build_cloze_questions
    from trustray.data.corpus import load_wiki_corpus
    from trustray.data.edits import load_edit_split

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    docs = load_wiki_corpus()
    topic_of_title = {doc["title"]: doc["topic"] for doc in docs}
    topic_of_doc = {doc["id"]: doc["topic"] for doc in docs}
    records = load_edit_split("train", seed=seed) + load_edit_split("dev", seed=seed)
    facts = [PreferencePrompt(f"fact-{r['id']}", "factual", r["prompt"], (r["target_true"],),
                              topic_of_title.get(r["title"], "")) for r in records]
    cloze = [PreferencePrompt(q["id"], "factual", q["question"], tuple(q["golden_answers"]), topic_of_doc[q["doc_id"]])
             for q in build_cloze_questions(count - count // 2, seed=seed)]
    rng = random.Random(seed)
    rng.shuffle(facts)
    picked = facts[: count // 2] + cloze
    if len(picked) < count:
        raise ValueError(f"only {len(picked)} factual prompts are available, {count} were asked for")
    rng.shuffle(picked)
    return picked


def sentiment_prompts(count: int, seed: int = 0, prefix_words: int = 6) -> list[PreferencePrompt]:
    """`count` requests to continue the first `prefix_words` words of a corpus sentence positively, one page
    each (FanOutQA evidence pages excluded)."""
    from trustray.core.rag.passages import split_sentences
    from trustray.data.cloze import evidence_titles
    from trustray.data.corpus import load_wiki_corpus

    if count < 1 or prefix_words < 2:
        raise ValueError(f"count must be at least 1 and prefix_words at least 2; got {count}, {prefix_words}")
    excluded = evidence_titles()
    docs = sorted((doc for doc in load_wiki_corpus() if doc["title"] not in excluded), key=lambda doc: doc["id"])
    rng = random.Random(seed)
    rng.shuffle(docs)
    prompts = []
    for doc in docs:
        sentences = [s for s in split_sentences(doc["text"]) if len(s.split()) > prefix_words + 3]
        if not sentences:
            continue
        prefix = " ".join(rng.choice(sentences).split()[:prefix_words])
        prompts.append(PreferencePrompt(f"sentiment-{doc['id']}", "sentiment",
                                        f"Continue this text in a positive tone: {prefix}", topic=doc["topic"]))
        if len(prompts) == count:
            return prompts
    raise ValueError(f"only {len(prompts)} sentiment prompts are available, {count} were asked for")


def load_prompts(task: str, count: int, seed: int = 0) -> list[PreferencePrompt]:
    if task == "factual":
        return factual_prompts(count, seed)
    if task == "sentiment":
        return sentiment_prompts(count, seed)
    raise ValueError(f"unknown preference task {task!r}; choose from {TASKS}")


# -- oracles ------------------------------------------------------------------------------------------------


@dataclass
class Oracle(ABC):
    """A programmatic annotator: `reward` is the gold reward r*, `label` a noisy comparison (module docstring)."""

    temperature: float = 0.0
    tie_margin: float = 0.0
    skip_rate: float = 0.0
    seed: int = 0
    task: ClassVar[str]

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.tie_margin < 0 or not 0 <= self.skip_rate < 1:
            raise ValueError("an oracle needs temperature >= 0, tie_margin >= 0 and 0 <= skip_rate < 1; got "
                             f"{self.temperature}, {self.tie_margin}, {self.skip_rate}")

    @abstractmethod
    def reward(self, prompt: PreferencePrompt, response: str) -> float:
        """The gold reward r* of `response` to `prompt`."""

    def preference_probability(self, prompt: PreferencePrompt, a: str, b: str) -> float:
        """P(a ≻ b) under the oracle's Bradley–Terry noise (0, 0.5 or 1 when τ = 0)."""
        gap = self.reward(prompt, a) - self.reward(prompt, b)
        if self.temperature == 0:
            return 0.5 if gap == 0 else float(gap > 0)
        return 1.0 / (1.0 + math.exp(-gap / self.temperature))

    def label(self, prompt: PreferencePrompt, a: str, b: str) -> Label:
        """"a", "b", "tie" or "skip"; the same for the same (seed, prompt, a, b) however often it is asked."""
        digest = hashlib.sha256(f"{self.seed}\x00{prompt.id}\x00{prompt.prompt}\x00{a}\x00{b}".encode()).digest()
        rng = random.Random(digest)
        if rng.random() < self.skip_rate:
            return "skip"
        if abs(self.reward(prompt, a) - self.reward(prompt, b)) <= self.tie_margin:
            return "tie"
        return "a" if rng.random() < self.preference_probability(prompt, a, b) else "b"


@dataclass
class FactualOracle(Oracle):
    """r*(y) = max(gold answer contained, token F1) − length_penalty · excess words (module docstring)."""

    length_penalty: float = 0.2
    free_words: int = 12
    task: ClassVar[str] = "factual"

    def reward(self, prompt: PreferencePrompt, response: str) -> float:
        if not prompt.gold:
            raise ValueError(f"prompt {prompt.id!r} has no gold answer; the factual oracle needs one")
        correctness = max(answer_contained(response, prompt.gold), token_f1(response, prompt.gold))
        excess = min(1.0, max(0, len(response.split()) - self.free_words) / self.free_words)
        return correctness - self.length_penalty * excess


@dataclass
class SentimentOracle(Oracle):
    """r*(y) = VADER's compound sentiment score of the response, in [−1, 1]."""

    task: ClassVar[str] = "sentiment"

    def __post_init__(self) -> None:
        super().__post_init__()
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def reward(self, prompt: PreferencePrompt, response: str) -> float:
        return float(self._analyzer.polarity_scores(response)["compound"])


ORACLES: dict[str, type[Oracle]] = {"factual": FactualOracle, "sentiment": SentimentOracle}


def build_oracle(task: str, **settings: Any) -> Oracle:
    if task not in ORACLES:
        raise ValueError(f"unknown preference task {task!r}; choose from {TASKS}")
    return ORACLES[task](**settings)


# -- TRL's preference format ---------------------------------------------------------------------------------


def preference_row(prompt: PreferencePrompt | str | Sequence[Mapping[str, str]], chosen: str, rejected: str,
                   **extra: Any) -> dict[str, Any]:
    """One row in TRL's conversational preference format, with `extra` fields kept."""
    if isinstance(prompt, PreferencePrompt):
        extra = {"prompt_id": prompt.id, "task": prompt.task, **extra}
        messages = prompt.messages()
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(message) for message in prompt]
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


def labelled_row(prompt: PreferencePrompt, a: str, b: str, label: Label, **extra: Any) -> dict[str, Any] | None:
    """The preference row a label gives (None for a tie or a skip, which carry no preference)."""
    if label not in LABELS:
        raise ValueError(f"a label is one of {LABELS}, got {label!r}")
    if label in ("tie", "skip"):
        return None
    chosen, rejected = (a, b) if label == "a" else (b, a)
    return preference_row(prompt, chosen, rejected, **extra)


def _conversation(value: Any, field: str, where: str, role: str | None) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role or "user", "content": value}]
    if (isinstance(value, list) and value
            and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value)):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{where}: `{field}` must be a string or a non-empty list of {{role, content}} messages")


def normalise_preference(row: Mapping[str, Any], where: str = "row") -> dict[str, Any]:
    """A row in either TRL form as the conversational form; a malformed row is an error naming `where`."""
    missing = [field for field in ("prompt", "chosen", "rejected") if row.get(field) in (None, "", [])]
    if missing:
        raise ValueError(f"{where}: missing {missing} (TRL's preference format needs prompt, chosen, rejected)")
    prompt = _conversation(row["prompt"], "prompt", where, "user")
    chosen = _conversation(row["chosen"], "chosen", where, "assistant")
    rejected = _conversation(row["rejected"], "rejected", where, "assistant")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError(f"{where}: `chosen` and `rejected` must end with an assistant message")
    return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_preferences(path: str | Path) -> list[dict[str, Any]]:
    """Preference rows from a JSONL or Parquet file, in TRL's conversational form."""
    rows = read_table(path)
    if not rows:
        raise ValueError(f"{path}: no preference rows")
    return [normalise_preference(row, f"{path} row {number}") for number, row in enumerate(rows, start=1)]


def write_preferences(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows (checked, conversational form) as JSONL, or Parquet for a `.parquet` / `.pq` path; atomic."""
    path = Path(path)
    checked = [normalise_preference(row, f"row {number}") for number, row in enumerate(rows, start=1)]
    if path.suffix.lower() not in PARQUET_SUFFIXES:
        return write_jsonl(checked, path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(pa.Table.from_pylist(checked), partial)
    os.replace(partial, path)  # the file appears whole or not at all
    return path
