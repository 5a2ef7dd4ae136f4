"""Chat examples -> token ids with response-only labels, and right-padded batches.

The loss (and so every gradient feature built from it) covers the final assistant message only: the prompt
part of the conversation gets label -100, as in LESS. The split is found from the tokenizer's own chat
template: the prompt rendered with `add_generation_prompt=True` must be a prefix of the full conversation's
render. The prompt and the response are tokenized separately and concatenated, which is exactly what the
model sees when it generates the response after that prompt (tokenizing the joined text could merge tokens
across the boundary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be split into a prompt and a response."""


class ResponseTruncatedError(ValueError):
    """Truncation to `max_length` removed every response token: the example would carry no loss."""


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one conversation whose last message is the assistant's response.

    Labels are the response tokens (including the template's end-of-turn token) and -100 elsewhere. Whitespace
    the template writes after the end-of-turn token (ChatML's trailing newline) is dropped: the model never
    generates it. Sequences longer than `max_length` keep their start (the end is cut, as in LESS); when
    nothing of the response is left, `ResponseTruncatedError` is raised so callers can skip and count the
    example instead of training on a zero-loss row.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise ValueError("a conversation needs at least one prompt message and must end with an assistant message")
    messages = [dict(message) for message in messages]
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError(
            "the chat template's prompt render (add_generation_prompt=True) is not a prefix of the full "
            "conversation's render, so the response tokens cannot be located; use a template that renders "
            "earlier turns identically whether or not a response follows"
        )
    response_text = full_text[len(prompt_text):].rstrip()
    if not response_text:
        raise ValueError("the assistant response renders to an empty string")
    # Templates emit their special tokens as text (e.g. a BOS), so the tokenizer must not add them again.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    input_ids = (list(prompt_ids) + list(response_ids))[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(response_ids))[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ResponseTruncatedError(
            f"the prompt alone has {len(prompt_ids)} tokens, so max_length={max_length} leaves no response token"
        )
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into `input_ids`, `attention_mask` and `labels` (-100 on padding).

    Examples that carry `inputs_embeds` (`[T, H]` cached hidden states) are batched as `inputs_embeds` instead
    of `input_ids`.

    Right padding keeps every example's real tokens at the same positions as when it is run alone, so
    per-example results do not depend on the batch it lands in.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example["input_ids"]) for example in examples)
    embedded = [example.get("inputs_embeds") for example in examples]
    if any(state is not None for state in embedded) and any(state is None for state in embedded):
        raise ValueError("either every example of a batch carries inputs_embeds or none does")
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if len(example["labels"]) != length:
            raise ValueError(f"example {row}: {length} input ids but {len(example['labels'])} labels")
        input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.as_tensor(example["labels"], dtype=torch.long)
    if embedded[0] is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    # Cached hidden states (see trustray.core.lm.prefix) replace the token ids as the model's input.
    states = torch.zeros((len(examples), width, embedded[0].shape[-1]), dtype=embedded[0].dtype)
    for row, state in enumerate(embedded):
        if state.shape[0] != len(examples[row]["input_ids"]):
            raise ValueError(f"example {row}: {state.shape[0]} cached states for {len(examples[row]['input_ids'])} tokens")
        states[row, : state.shape[0]] = state
    return {"inputs_embeds": states, "attention_mask": attention_mask, "labels": labels}
