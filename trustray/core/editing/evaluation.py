"""Edit success, generalisation and locality of an (edited) model, plus the perplexity general-ability check.

Teacher-forced (the literature's ES / GS / LS): per record, the fraction of answer tokens that are the model's
argmax given the gold prefix — ES on `(prompt, target_new)`, GS on every `(paraphrase, target_new)`, LS as the
agreement with the unedited model's argmax on `(locality prompt, answer)` (`reference` predictions), since a
small model may never have known the gold locality answers; `ls_gold` reports accuracy against them too, and
`ls_known` the fraction of the gold tokens the unedited model predicted that it still predicts (records with
none are left out). The records' probes share the edits' relations and templates; `probe_scores` measures a
`ProbeSet` of questions no edit is about (the papers' locality: gold accuracy before/after and its drawdown,
agreement, and how many exactly-known answers are kept). Only
the answer's own tokens are scored: the template's end-of-turn token is not (a model that ends its turn after a
wrong answer would otherwise score on a fact it does not know).
By generation: the greedy continuation of the chat prompt contains `target_new` (case-insensitive).

When every edited layer lies above decoder layer `k`, the layers below see the same inputs before and after an
edit: `prefix_cache` runs them once for all pairs, and scoring any number of edit sets of those records costs only
the layers from `k` up (the results are identical to the full model's).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trustray.core.editing.base import EditRecord, batches, encode_pairs
from trustray.core.editing.metrics import (
    agreement,
    answer_predictions,
    exact_match,
    known_tokens,
    token_accuracy,
)
from trustray.core.lm.batching import IGNORE_INDEX
from trustray.core.lm.losses import example_losses
from trustray.core.lm.prefix import prefix_states, skipped_prefix, with_states

KINDS = ("edit", "paraphrase", "locality")
PROBES = "probes"  # the prefix cache's kind for a `ProbeSet`


def _pairs(records: Sequence[EditRecord], kind: str) -> tuple[list[str], list[str], list[int]]:
    """(prompts, answers, owning record index) for `kind` in edit / paraphrase / locality."""
    prompts, answers, owners = [], [], []
    for index, record in enumerate(records):
        if kind == "edit":
            items = [(record["prompt"], record["target_new"])]
        elif kind == "paraphrase":
            items = [(paraphrase, record["target_new"]) for paraphrase in record["paraphrases"]]
        else:
            items = [(item["prompt"], item["answer"]) for item in record["locality"]]
        for prompt, answer in items:
            prompts.append(prompt)
            answers.append(answer)
            owners.append(index)
    return prompts, answers, owners


def answer_examples(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                    max_length: int) -> list[dict[str, Any]]:
    """Encoded chat pairs with labels on the answer's own tokens (special tokens unlabelled)."""
    special = set(tokenizer.all_special_ids)
    return [{**example, "labels": [IGNORE_INDEX if label in special else label for label in example["labels"]]}
            for example in encode_pairs(tokenizer, prompts, answers, max_length)]


def scored_examples(tokenizer: Any, records: Sequence[EditRecord], kind: str,
                    max_length: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Encoded pairs of `kind` (see `answer_examples`), and the record owning each."""
    prompts, answers, owners = _pairs(records, kind)
    return answer_examples(tokenizer, prompts, answers, max_length), owners


@dataclass
class PrefixCache:
    """Every scored pair's hidden states at the input of decoder layer `layers`, per kind, in `_pairs` order."""

    layers: int
    states: dict[str, list[Tensor]] = field(default_factory=dict)

    def first_records(self, owners_per_kind: Mapping[str, Sequence[int]]) -> PrefixCache:
        """The cache of a prefix of the records it was built for (pairs are ordered by record)."""
        return PrefixCache(self.layers, {kind: self.states[kind][: len(owners)]
                                         for kind, owners in owners_per_kind.items()})


def prefix_cache(model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], layers: int,
                 batch_size: int = 16, max_length: int = 128, probes: ProbeSet | None = None) -> PrefixCache:
    """Run the decoder layers below `layers` once for every pair `teacher_forced_scores` scores on `records`, and
    for the `probes` (kind "probes") when given."""
    cache = PrefixCache(layers)
    for kind in KINDS:
        examples, _ = scored_examples(tokenizer, records, kind, max_length)
        cache.states[kind] = prefix_states(model, examples, layers, batch_size) if examples else []
    if probes is not None:
        cache.states[PROBES] = prefix_states(model, probes.examples(tokenizer, max_length), layers, batch_size)
    return cache


def _predict(model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
             prefix: PrefixCache | None, kind: str) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Teacher-forced (argmax predictions, targets, answer mask) per batch, on the cached prefix when given."""
    device = next(model.parameters()).device
    bypass = contextlib.nullcontext()
    if prefix is not None:
        examples = with_states(examples, prefix.states[kind][: len(examples)])
        bypass = skipped_prefix(model, prefix.layers, require_frozen=False)
    with bypass:
        return [tuple(t.cpu() for t in answer_predictions(model, batch)) for batch in batches(examples, batch_size, device)]


def _per_record(values: Tensor, owners: Sequence[int], count: int) -> Tensor:
    """Mean of each record's values (a record has several paraphrases / locality prompts)."""
    sums = torch.zeros(count).index_add_(0, torch.tensor(owners), values)
    counts = torch.zeros(count).index_add_(0, torch.tensor(owners), torch.ones(len(owners)))
    return sums / counts.clamp(min=1)


def locality_reference(model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], batch_size: int = 16,
                       max_length: int = 128, prefix: PrefixCache | None = None) -> list[Tensor]:
    """The unedited model's predictions on each locality pair `[T-1]`: compute before applying an edit."""
    examples, _ = scored_examples(tokenizer, records, "locality", max_length)
    if not examples:
        return []
    predictions = [row for batch, _, _ in _predict(model, examples, batch_size, prefix, "locality") for row in batch]
    return [row[: len(example["input_ids"]) - 1] for row, example in zip(predictions, examples, strict=True)]


def _padded(rows: Sequence[Tensor], width: int) -> Tensor:
    """Per-pair predictions stacked into a batch of `width` positions (padding never counts: it is unmasked)."""
    batch = torch.full((len(rows), width), -1, dtype=torch.long)
    for index, row in enumerate(rows):
        batch[index, : min(len(row), width)] = row[:width]
    return batch


def teacher_forced_scores(
    model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], reference: Sequence[Tensor],
    batch_size: int = 16, max_length: int = 128, prefix: PrefixCache | None = None,
) -> dict[str, float]:
    """Mean ES, GS, LS (agreement with `reference`), LS against gold answers, and exact-match ES over records.

    `reference` holds the unedited model's locality predictions for these records (`locality_reference`).
    `prefix` is a `prefix_cache` of these records (or of a longer list starting with them). A metric whose pairs
    are absent from every record (no paraphrases, no locality probes) is left out.
    """
    scores: dict[str, float] = {}
    for kind, key in zip(KINDS, ("es", "gs", "ls"), strict=True):
        examples, owners = scored_examples(tokenizer, records, kind, max_length)
        if not examples:  # e.g. API edits sent without paraphrases or locality probes
            continue
        results = _predict(model, examples, batch_size, prefix, kind)
        accuracy = torch.cat([token_accuracy(*result) for result in results])
        scores[key if kind != "locality" else "ls_gold"] = float(_per_record(accuracy, owners, len(records)).mean())
        if kind == "edit":
            exact = torch.cat([exact_match(*result) for result in results])
            scores["es_exact"] = float(exact.mean())
        if kind == "locality":
            if len(reference) != len(examples):
                raise ValueError(f"{len(reference)} reference predictions for {len(examples)} locality pairs; "
                                 "recompute them for these records")
            agree, known, kept, start = [], [], [], 0
            for predictions, targets, mask in results:
                rows = _padded(reference[start : start + len(predictions)], predictions.shape[1])
                agree.append(agreement(predictions, rows, mask))
                known_count, kept_count = known_tokens(predictions, rows, targets, mask)
                known.append(known_count)
                kept.append(kept_count)
                start += len(predictions)
            scores["ls"] = float(_per_record(torch.cat(agree), owners, len(records)).mean())
            known_counts, kept_counts = torch.cat(known).float(), torch.cat(kept).float()
            per_record_known = _per_record(known_counts, owners, len(records))
            has_known = per_record_known > 0
            if has_known.any():
                per_record_kept = _per_record(kept_counts, owners, len(records)) / per_record_known.clamp(min=1e-12)
                scores["ls_known"] = float(per_record_kept[has_known].mean())
                scores["ls_known_records"] = int(has_known.sum())
    return scores


@dataclass(frozen=True)
class ProbeSet:
    """Fixed questions with gold answers that no edit is about (e.g. `trustray.data.offtemplate`): the editing
    papers' locality set. `sources` names where each came from, for a breakdown."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    sources: tuple[str, ...]

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, str]]) -> ProbeSet:
        """From `{prompt, answer, source}` rows."""
        if not rows:
            raise ValueError("a probe set needs at least one question")
        return cls(tuple(r["prompt"] for r in rows), tuple(r["answer"] for r in rows),
                   tuple(r.get("source", "all") for r in rows))

    def examples(self, tokenizer: Any, max_length: int = 128) -> list[dict[str, Any]]:
        return answer_examples(tokenizer, self.prompts, self.answers, max_length)


def probe_reference(model: nn.Module, tokenizer: Any, probes: ProbeSet, batch_size: int = 16,
                    max_length: int = 128, prefix: PrefixCache | None = None) -> list[Tensor]:
    """The unedited model's teacher-forced predictions on each probe `[T-1]`: compute before applying an edit."""
    examples = probes.examples(tokenizer, max_length)
    predictions = [row for batch, _, _ in _predict(model, examples, batch_size, prefix, PROBES) for row in batch]
    return [row[: len(example["input_ids"]) - 1] for row, example in zip(predictions, examples, strict=True)]


def probe_scores(model: nn.Module, tokenizer: Any, probes: ProbeSet, reference: Sequence[Tensor],
                 batch_size: int = 16, max_length: int = 128, prefix: PrefixCache | None = None) -> dict[str, Any]:
    """Locality on a probe set, before (`reference`, the unedited model's predictions) and after:

    - `gold` / `gold_before`: mean teacher-forced accuracy on the gold answer tokens (the papers' LS), and
      `drawdown` = before − after (MEND's measure; > 0 is a loss);
    - `agreement`: mean fraction of answer tokens whose argmax is unchanged;
    - `known_kept`: of the probes the unedited model answered exactly (every gold token its argmax), the fraction
      still answered exactly (`known`: how many it knew; None when it knew none);
    - `known_tokens_kept`: of all the gold answer tokens the unedited model predicted (`known_tokens`), the
      fraction still predicted (a small model may know few answers exactly but many of their tokens).

    The same keys per source under `by_source`.
    """
    examples = probes.examples(tokenizer, max_length)
    if len(reference) != len(examples):
        raise ValueError(f"{len(reference)} reference predictions for {len(examples)} probes; recompute them")
    after, before, agree, known, kept, tokens_known, tokens_kept, start = [], [], [], [], [], [], [], 0
    for predictions, targets, mask in _predict(model, examples, batch_size, prefix, PROBES):
        rows = _padded(reference[start : start + len(predictions)], predictions.shape[1])
        start += len(predictions)
        after.append(token_accuracy(predictions, targets, mask))
        before.append(token_accuracy(rows, targets, mask))
        agree.append(agreement(predictions, rows, mask))
        known.append(exact_match(rows, targets, mask).bool())
        kept.append(exact_match(predictions, targets, mask).bool())
        known_count, kept_count = known_tokens(predictions, rows, targets, mask)
        tokens_known.append(known_count)
        tokens_kept.append(kept_count)
    columns = {"after": torch.cat(after), "before": torch.cat(before), "agree": torch.cat(agree),
               "known": torch.cat(known), "kept": torch.cat(kept), "tokens_known": torch.cat(tokens_known),
               "tokens_kept": torch.cat(tokens_kept)}

    def summary(selected: Tensor) -> dict[str, Any]:
        knew = columns["known"] & selected
        gold, gold_before = float(columns["after"][selected].mean()), float(columns["before"][selected].mean())
        token_count = int(columns["tokens_known"][selected].sum())
        return {"n": int(selected.sum()), "gold": gold, "gold_before": gold_before, "drawdown": gold_before - gold,
                "agreement": float(columns["agree"][selected].mean()), "known": int(knew.sum()),
                "known_kept": float(columns["kept"][knew].float().mean()) if knew.any() else None,
                "known_tokens": token_count,
                "known_tokens_kept": int(columns["tokens_kept"][selected].sum()) / token_count if token_count else None}

    sources = list(probes.sources)
    result = summary(torch.ones(len(sources), dtype=torch.bool))
    result["by_source"] = {source: summary(torch.tensor([s == source for s in sources]))
                           for source in dict.fromkeys(sources)}
    return result


def generation_scores(
    generate: Callable[[list[str]], list[str]], records: Sequence[EditRecord]
) -> dict[str, float]:
    """ES / GS by generation: the answer to the prompt (first paraphrase) contains `target_new`."""
    def hit_rate(prompts: list[str]) -> float:
        replies = generate(prompts)
        targets = [record["target_new"].lower() for record in records]
        return sum(target in reply.lower() for target, reply in zip(targets, replies, strict=True)) / len(records)

    return {"es_generate": hit_rate([r["prompt"] for r in records]),
            "gs_generate": hit_rate([r["paraphrases"][0] for r in records])}


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 256,
               batch_size: int = 8) -> float:
    """Token-weighted perplexity of plain text (no chat template): the general-language check after editing."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] for text in texts[start : start + batch_size]]
        examples: list[Mapping[str, list[int]]] = [{"input_ids": i, "labels": i} for i in ids if len(i) > 1]
        if not examples:
            continue
        batch = batches(examples, len(examples), device)[0]
        losses = example_losses(model, batch)
        counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
        total_loss += float((losses.cpu() * counts.cpu()).sum())
        total_tokens += int(counts.sum())
    if total_tokens == 0:
        raise ValueError("no text to measure perplexity on")
    return math.exp(total_loss / total_tokens)
