"""Edit success, generalisation and locality of an (edited) model, plus the perplexity general-ability check.

Teacher-forced (the literature's ES / GS / LS): per record, the fraction of answer tokens that are the model's
argmax given the gold prefix — ES on `(prompt, target_new)`, GS on every `(paraphrase, target_new)`, LS as the
agreement with the unedited model's argmax on `(locality prompt, answer)` (`reference` predictions), since a
small model may never have known the gold locality answers; `ls_gold` reports accuracy against them too. Only
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
from trustray.core.editing.metrics import agreement, answer_predictions, exact_match, token_accuracy
from trustray.core.lm.batching import IGNORE_INDEX
from trustray.core.lm.losses import example_losses
from trustray.core.lm.prefix import prefix_states, skipped_prefix, with_states

KINDS = ("edit", "paraphrase", "locality")


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


def scored_examples(tokenizer: Any, records: Sequence[EditRecord], kind: str,
                    max_length: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Encoded pairs of `kind` with labels on the answer's own tokens (special tokens unlabelled), and owners."""
    prompts, answers, owners = _pairs(records, kind)
    special = set(tokenizer.all_special_ids)
    examples = [{**example, "labels": [IGNORE_INDEX if label in special else label for label in example["labels"]]}
                for example in encode_pairs(tokenizer, prompts, answers, max_length)]
    return examples, owners


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
                 batch_size: int = 16, max_length: int = 128) -> PrefixCache:
    """Run the decoder layers below `layers` once for every pair `teacher_forced_scores` scores on `records`."""
    cache = PrefixCache(layers)
    for kind in KINDS:
        examples, _ = scored_examples(tokenizer, records, kind, max_length)
        cache.states[kind] = prefix_states(model, examples, layers, batch_size) if examples else []
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
            agree, start = [], 0
            for predictions, _, mask in results:
                rows = reference[start : start + len(predictions)]
                agree.append(agreement(predictions, _padded(rows, predictions.shape[1]), mask))
                start += len(predictions)
            scores["ls"] = float(_per_record(torch.cat(agree), owners, len(records)).mean())
    return scores


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
