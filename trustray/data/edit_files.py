"""Users' knowledge-editing files: zsRE (MEND/ROME/EasyEdit format) and CounterFact, as `trustray.data.edits` records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trustray.data.edits import check_split
from trustray.data.io import read_jsonl
from trustray.data.wiki_facts import upper_first

ZSRE_LOC_PREFIX = "nq question:"


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
    return upper_first(text if text.endswith("?") else text + "?")


def load_zsre(path: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """zsRE edits in the MEND/ROME/EasyEdit format (`zsre_mend_train.json`, `zsre_mend_eval.json`).

    Each object has `subject`, `src` (question), `rephrase`, `answers` (true answers; the first is `target_true`),
    `alt` (the new answer), `loc` ("nq question: ...") and `loc_ans`. zsRE has no relation labels, so `relation` is
    "zsre"; `split` labels the records (the published files are a train and an eval file).
    """
    check_split(split)
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
    check_split(split)
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
