"""The locality check an edit set passes before it is served: do unrelated questions keep their answers?

A fixed set of unrelated questions (the probes) is answered greedily by the unedited model once; after an edit set is
applied the same questions are answered again, and the fraction whose answer is unchanged (after normalising
whitespace) is the edit set's `locality_kept`. Greedy decoding makes the comparison exact and repeatable: any
changed answer is a change the edit caused.

The probes are chosen by the caller (the Serve editor takes `trustray.data.edits.locality_probe_questions`: a seeded
sample of the bundled edit dataset's held-out pool facts, whose subjects are never edited). The default anchors that
`ft_kl` trains on are drawn with the probe questions excluded (`trustray.data.edits.default_locality_anchors`), so the
check never measures on what the editor was held to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Answerer = Callable[[Sequence[str]], list[str]]
"""Questions -> the current model's greedy answers, in order."""


def normalize_answer(text: str) -> str:
    """The answer with runs of whitespace collapsed and the ends stripped."""
    return " ".join(text.split())


def kept_fraction(reference: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of `answers` equal to the `reference` answer at the same position (whitespace normalised)."""
    if len(reference) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(reference)} reference answers")
    if not reference:
        raise ValueError("the locality check needs at least one probe question")
    kept = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(reference, answers, strict=True))
    return kept / len(reference)


class LocalityCheck:
    """Probe questions and the unedited model's answers to them, taken once at construction.

    `measure()` answers the probes again with whatever weights the model has now (apply an edit set first).
    """

    def __init__(self, answer: Answerer, questions: Sequence[str]):
        if not questions:
            raise ValueError("the locality check needs at least one probe question")
        self.answer = answer
        self.questions = list(questions)
        self.reference = answer(self.questions)

    def measure(self) -> dict[str, float | int]:
        """`{"locality_kept": fraction of probes answered as before, "locality_probes": number of probes}`."""
        kept = kept_fraction(self.reference, self.answer(self.questions))
        return {"locality_kept": round(kept, 4), "locality_probes": len(self.questions)}


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int = 16,
                   batch_size: int = 16) -> list[str]:
    """The model's greedy replies to single-turn chat `questions` (at most `max_new_tokens` each), batched.

    Prompts are left-padded so every row's reply starts at the same position; the replies are decoded without
    special tokens.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True)
            for question in questions[start : start + batch_size]
        ]
        # Templates emit their special tokens as text, so the tokenizer must not add them again.
        encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return answers
