"""Edit success, generalisation and locality of an (edited) model, plus the perplexity general-ability check.

Teacher-forced (the literature's ES / GS / LS): per record, the fraction of answer tokens that are the model's
argmax given the gold prefix — ES on `(prompt, target_new)`, GS on every `(paraphrase, target_new)`, LS as the
agreement with the unedited model's argmax on `(locality prompt, answer)` (`reference` predictions), since a
small model may never have known the gold locality answers; `ls_gold` reports accuracy against them too.
By generation: the greedy continuation of the chat prompt contains `target_new` (case-insensitive).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trustray.core.editing.base import EditRecord, batches, encode_pairs
from trustray.core.editing.metrics import agreement, answer_predictions, exact_match, token_accuracy
from trustray.core.influence.gradients import example_losses


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


def predict(model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int,
            max_length: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Teacher-forced argmax predictions, targets and answer masks, one triple per batch."""
    device = next(model.parameters()).device
    encoded = encode_pairs(tokenizer, prompts, answers, max_length)
    return [tuple(t.cpu() for t in answer_predictions(model, batch)) for batch in batches(encoded, batch_size, device)]


def _per_record(values: Tensor, owners: Sequence[int], count: int) -> Tensor:
    """Mean of each record's values (a record has several paraphrases / locality prompts)."""
    sums = torch.zeros(count).index_add_(0, torch.tensor(owners), values)
    counts = torch.zeros(count).index_add_(0, torch.tensor(owners), torch.ones(len(owners)))
    return sums / counts.clamp(min=1)


def locality_reference(model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], batch_size: int = 16,
                       max_length: int = 128) -> list[Tensor]:
    """The unedited model's predictions on the locality pairs: compute before applying an edit."""
    prompts, answers, _ = _pairs(records, "locality")
    return [predictions for predictions, _, _ in predict(model, tokenizer, prompts, answers, batch_size, max_length)]


def teacher_forced_scores(
    model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], reference: Sequence[Tensor],
    batch_size: int = 16, max_length: int = 128,
) -> dict[str, float]:
    """Mean ES, GS, LS (agreement with `reference`), LS against gold answers, and exact-match ES over records.

    A metric whose pairs are absent from every record (no paraphrases, no locality probes) is left out.
    """
    scores: dict[str, float] = {}
    for kind, key in (("edit", "es"), ("paraphrase", "gs"), ("locality", "ls")):
        prompts, answers, owners = _pairs(records, kind)
        if not prompts:  # e.g. API edits sent without paraphrases or locality probes
            continue
        results = predict(model, tokenizer, prompts, answers, batch_size, max_length)
        accuracy = torch.cat([token_accuracy(*result) for result in results])
        scores[key if kind != "locality" else "ls_gold"] = float(_per_record(accuracy, owners, len(records)).mean())
        if kind == "edit":
            exact = torch.cat([exact_match(*result) for result in results])
            scores["es_exact"] = float(exact.mean())
        if kind == "locality":
            if len(reference) != len(results):
                raise ValueError("reference predictions do not match the locality batches; recompute them")
            agree = torch.cat([agreement(p, ref, m) for (p, _, m), ref in zip(results, reference, strict=True)])
            scores["ls"] = float(_per_record(agree, owners, len(records)).mean())
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
