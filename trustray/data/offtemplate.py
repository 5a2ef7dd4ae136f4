"""Off-template questions: locality measured the way the editing papers measure it.

The edit records' own locality probes reuse the edit relations and templates (a same-relation probe per record,
most sharing the edit's true answer): a harsh test. MALMEN and MEMIT report locality on questions that share
nothing with the edits (zsRE edits, Natural Questions probes); MEND reports the drop in accuracy there. These
questions play that role for the bundled edit data, from two sources:

- `fanoutqa`: FanOutQA dev single-hop questions with a single gold answer of at most `MAX_ANSWER_WORDS` words
  (human-written Wikipedia questions, like Natural Questions), whose evidence page is not the page of any edit
  record's subject and which no edit template matches;
- `cloze`: one sentence (at most `MAX_SENTENCE_WORDS` words) of a Wikipedia intro with a year or name blanked,
  asked about its page ("About X, fill in the blank: ..."), from pages no edit record is about (the never-edited
  pool's pages and pages without a fact).

Neither uses an edit relation's template, and no question is about a subject any split edits, so every question
is off-template for every batch of edits. Each row is `{id, source, prompt, answer}`; the sample is seeded.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any

from trustray.data.cloze import build_cloze_questions
from trustray.data.edits import TEMPLATES, edited_titles
from trustray.data.qa import load_fanoutqa_single_hop

MAX_ANSWER_WORDS = 5
MAX_SENTENCE_WORDS = 24  # a cloze prompt with its chat template stays well inside 128 tokens
SEED_SALT = "offtemplate"


def edit_template_patterns() -> list[re.Pattern[str]]:
    """One regular expression per edit question template, its subject slot matching any text."""
    return [re.compile(re.escape(template).replace(re.escape("{}"), ".+") + "$")
            for templates in TEMPLATES.values() for template in templates]


def eligible_fanoutqa(seed: int = 0) -> list[dict[str, Any]]:
    """FanOutQA dev single-hop questions with one short gold answer, about no page an edit record is about and
    not phrased like an edit template ("When did Gustav IV Adolf die?" is one)."""
    edited, patterns = edited_titles(seed), edit_template_patterns()
    rows = []
    for row in load_fanoutqa_single_hop():
        answers = row["golden_answers"]
        if (len(answers) == 1 and len(answers[0].split()) <= MAX_ANSWER_WORDS
                and row["metadata"].get("evidence_title") not in edited
                and not any(pattern.match(row["question"]) for pattern in patterns)):
            rows.append({"id": f"fanoutqa-{row['id']}", "source": "fanoutqa", "prompt": row["question"],
                         "answer": answers[0]})
    return sorted(rows, key=lambda row: row["id"])


@lru_cache(maxsize=4)
def _questions(fanoutqa: int, cloze: int, seed: int) -> tuple[dict[str, Any], ...]:
    pool = eligible_fanoutqa(seed)
    if fanoutqa > len(pool):
        raise ValueError(f"only {len(pool)} eligible FanOutQA questions, {fanoutqa} were asked for")
    rows = random.Random(f"{SEED_SALT}:{seed}").sample(pool, fanoutqa)
    for question in build_cloze_questions(cloze, seed=seed, max_sentence_words=MAX_SENTENCE_WORDS,
                                          exclude_titles=edited_titles(seed)):
        rows.append({"id": question["id"], "source": "cloze", "prompt": question["question"],
                     "answer": question["golden_answers"][0]})
    return tuple(rows)


def load_offtemplate_questions(fanoutqa: int = 200, cloze: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """`fanoutqa` + `cloze` off-template questions `{id, source, prompt, answer}` (see the module docstring)."""
    if fanoutqa < 0 or cloze < 0 or fanoutqa + cloze == 0:
        raise ValueError(f"ask for at least one off-template question (fanoutqa={fanoutqa}, cloze={cloze})")
    return [dict(row) for row in _questions(fanoutqa, cloze, seed)]
