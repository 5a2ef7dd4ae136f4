"""The abstractive compressor's model (RECOMP): a small LM that writes the context the chat model gets.

`Summarizer` wraps any `AutoModelForSeq2SeqLM` (encoder-decoder) or `AutoModelForCausalLM` with its tokenizer. It
reads the question and the retrieved passages (`summarizer_prompt`) and writes the facts worth keeping, or nothing,
which means "answer closed book" (selective augmentation).

Training targets come from the chat model's feedback, as in RECOMP: among a question's candidate summaries,
including the empty one, the target is the one under which the chat model finds the gold answer most likely
(`feedback_target`). The candidates here are the LSR teacher signal's: EMPTY and every retrieved sentence, each
already scored by the chat model, so distillation needs no further chat-model calls.

Batches are padded on the right for training (labels only on the target and its end token) and on the left for a
causal model's generation, so every prompt ends where its continuation starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trustray.core.rag.prompting import format_passages

IGNORE_INDEX = -100
INSTRUCTION = ("Copy the facts from the passages that help answer the question, in as few words as possible. "
               "If no passage helps, write nothing.")


def passages_from_candidates(titles: Sequence[str], sentences: Sequence[str]) -> list[tuple[str, str]]:
    """Candidate sentences back into `(title, text)` passages: consecutive sentences of one title are joined."""
    if len(titles) != len(sentences):
        raise ValueError(f"{len(titles)} titles for {len(sentences)} sentences")
    passages: list[tuple[str, str]] = []
    for title, sentence in zip(titles, sentences, strict=True):
        if passages and passages[-1][0] == title:
            passages[-1] = (title, f"{passages[-1][1]} {sentence}")
        else:
            passages.append((title, sentence))
    return passages


def feedback_target(candidates: Sequence[str], lm_logprobs: Sequence[float]) -> str:
    """The candidate (column 0 = EMPTY, "") under which the chat model finds the gold answer most likely."""
    if len(lm_logprobs) != 1 + len(candidates):
        raise ValueError(f"{len(lm_logprobs)} chat-model scores for EMPTY + {len(candidates)} candidates")
    best = max(range(len(lm_logprobs)), key=lambda index: lm_logprobs[index])
    return "" if best == 0 else candidates[best - 1]


class Summarizer:
    """A seq2seq or causal LM that writes compressed context; `loss` trains it, `summarize` runs it."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_input_tokens: int = 512, max_new_tokens: int = 64) -> None:
        if max_input_tokens < 16 or max_new_tokens < 1:
            raise ValueError("max_input_tokens must be >= 16 and max_new_tokens >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_input_tokens, self.max_new_tokens = max_input_tokens, max_new_tokens
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if tokenizer.eos_token_id is None:
            raise ValueError("the summarizer's tokenizer needs an end-of-sequence token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question: str, passages: Sequence[tuple[str, str]]) -> list[int]:
        """The prompt's tokens; the passages are cut (at the end) so that the whole fits `max_input_tokens` (a
        question too long for it is cut too: the summary is then empty or poor, never an error at serving time)."""
        tail = self._ids("\n\nFacts:")
        head = self._ids(f"{INSTRUCTION}\n\nQuestion: {question}\n\nPassages:\n")[: self.max_input_tokens - len(tail)]
        room = self.max_input_tokens - len(head) - len(tail)
        return head + self._ids(format_passages(passages))[:room] + tail

    def examples(self, questions: Sequence[str], passages: Sequence[Sequence[tuple[str, str]]],
                 targets: Sequence[str]) -> list[dict[str, list[int]]]:
        """Training examples: the target (possibly empty) then the end token, the only labelled tokens."""
        if not len(questions) == len(passages) == len(targets):
            raise ValueError(f"{len(questions)} questions, {len(passages)} passage lists, {len(targets)} targets")
        examples = []
        for question, group, target in zip(questions, passages, targets, strict=True):
            prompt = self.prompt_ids(question, group)
            answer = (self._ids(" " + target.strip()) if target.strip() else [])[: self.max_new_tokens - 1]
            answer = answer + [self.tokenizer.eos_token_id]
            if self.encoder_decoder:
                examples.append({"input_ids": prompt, "labels": answer})
            else:
                examples.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
        return examples

    def _batch(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        for row, example in enumerate(examples):
            ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
            mask[row, : len(example["input_ids"])] = 1
        label_width = max(len(e["labels"]) for e in examples)
        labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, : len(example["labels"])] = torch.tensor(example["labels"])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "labels": labels.to(self.device)}

    def loss(self, examples: Sequence[dict[str, list[int]]]) -> Tensor:
        """Mean cross-entropy of the labelled tokens of a batch (the model's own label shift)."""
        return self.model(**self._batch(examples)).loss

    @torch.no_grad()
    def summarize(self, questions: Sequence[str], passages: Sequence[Sequence[tuple[str, str]]]) -> list[str]:
        """Greedy summaries, one per question ("" = nothing worth keeping)."""
        if len(questions) != len(passages):
            raise ValueError(f"{len(questions)} questions but {len(passages)} passage lists")
        if not questions:
            return []
        prompts = [self.prompt_ids(question, group) for question, group in zip(questions, passages, strict=True)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if self.encoder_decoder:  # the encoder reads right-padded input
                ids[row, : len(prompt)], mask[row, : len(prompt)] = torch.tensor(prompt), 1
            else:  # a decoder continues where the prompt ends: pad on the left
                ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
        was_training = self.model.training
        self.model.eval()
        output = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                     max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id)
        self.model.train(was_training)
        new = output if self.encoder_decoder else output[:, width:]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


KIND = "summarizer"


def save_summarizer(folder: Any, summarizer: Summarizer, metadata: dict[str, Any]) -> None:
    """Model, tokenizer and `metadata.json` (with the input/output lengths), appearing whole or not at all."""
    from trustray.artifacts import atomic_folder, write_metadata

    with atomic_folder(folder) as tmp:
        summarizer.model.save_pretrained(tmp / "model")
        summarizer.tokenizer.save_pretrained(tmp / "model")
        write_metadata(tmp, {**metadata, "kind": KIND, "encoder_decoder": summarizer.encoder_decoder,
                             "max_input_tokens": summarizer.max_input_tokens,
                             "max_new_tokens": summarizer.max_new_tokens})
